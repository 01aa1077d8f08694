"""python -m export: bad input gives one line on stderr, a non-zero exit, nothing overwritten."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from export.__main__ import main
from training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def tree(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.fixture
def corrupt_run(tiny_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "corrupt-run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"not a checkpoint at all")
    (run / "tokenizer.json").write_bytes((tiny_run / "tokenizer.json").read_bytes())
    return run


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing checkpoint", "checkpoint not found"),
        ("corrupt checkpoint", "cannot read checkpoint"),
        ("non-bundle folder", "refusing to overwrite"),
        ("int8 without data", "--quantize int8 needs --data"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(
    case: str,
    expected: str,
    tiny_run: Path,
    corrupt_run: Path,
    tiny_bundle: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    checkpoint, out, extra = tiny_run, tmp_path / "out", []
    if case == "missing checkpoint":
        checkpoint = tmp_path / "no-such-run"
    elif case == "corrupt checkpoint":
        checkpoint = corrupt_run
    elif case == "non-bundle folder":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    else:
        extra = ["--quantize", "int8"]
    before = tree(out) if out.exists() else None
    capsys.readouterr()
    code = main(["--checkpoint", str(checkpoint), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1
    assert err.startswith("error: ")
    assert expected in err
    assert (tree(out) if out.exists() else None) == before


def test_the_module_entry_point_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "--checkpoint",
            str(tmp_path / "nothing"),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    assert result.stderr == f"error: checkpoint not found: {tmp_path / 'nothing'}\n"
    assert not (tmp_path / "out").exists()


def test_export_replaces_an_existing_bundle(
    data_bundle: Path, tiny_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    for name, data in tree(data_bundle).items():
        (out / name).write_bytes(data)
    (out / "stale.txt").write_text("from an older export")
    assert main(["--checkpoint", str(tiny_run / "best.pt"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "decode_run.onnx",
        "manifest.json",
        "model.onnx",
        "prefill.onnx",
        "sampling_direct.onnx",
        "sampling_envelope.onnx",
        "sequence_logprobs.onnx",
        "step_softmax.onnx",
        "tokenizer.json",
    ]


def leave_marker(path: str) -> None:
    Path(path).write_text("unpickled")


class Trap:
    """Unpickling it calls leave_marker: the code a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return leave_marker, (str(self.marker),)


def test_a_checkpoint_holding_a_pickled_object_is_refused_without_running_it(
    tiny_checkpoint: Path, tiny_run: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    run = tmp_path / "trojan-run"
    run.mkdir()
    (run / "tokenizer.json").write_bytes((tiny_run / "tokenizer.json").read_bytes())
    payload = load_checkpoint(tiny_checkpoint)  # a valid checkpoint, plus one object
    torch.save({**payload, "note": Trap(marker)}, run / "best.pt")

    result = subprocess.run(
        [sys.executable, "-m", "export", "--checkpoint", str(run), "--out", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: refusing checkpoint {run / 'best.pt'}: ")
    assert f"{__name__}.leave_marker" in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()

    # the trap is real: an unsafe load would have run it
    torch.load(run / "best.pt", weights_only=False)
    assert marker.read_text() == "unpickled"
