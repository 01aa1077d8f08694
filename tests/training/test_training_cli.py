"""The command line: bad input fails in one line and leaves a run untouched; --resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from training.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
RUN_FILES = ("checkpoint.pt", "best.pt", "tokenizer.json", "metrics.json")


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "training", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def existing_run(tmp_path: Path, tiny_run: Path) -> tuple[Path, dict[str, bytes]]:
    """A copy of a finished run and the bytes of its files."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    return out, {name: (out / name).read_bytes() for name in RUN_FILES}


def bad_corpora(folder: Path) -> dict[str, list[str | Path]]:
    folder.mkdir()
    malformed = folder / "malformed.json"
    malformed.write_text('[{"title": "Tea", "directions": ["Boil water."]')
    empty = folder / "empty.json"
    empty.write_text(json.dumps([{"title": "Tea", "directions": []}, {"directions": ["Boil."]}]))
    good = folder / "good.txt"
    good.write_text("Recipe for Tea | Boil water.\nRecipe for Ice | Freeze water.\n")
    return {
        "missing file": ["--data", folder / "absent.json"],
        "malformed json": ["--data", malformed],
        "empty after filtering": ["--data", empty],
        "unknown preset": ["--data", good, "--preset", "huge"],
        "zero epochs": ["--data", good, "--epochs", "0"],
        "epochs not a number": ["--data", good, "--epochs", "two"],
        "resume changing the seed": ["--data", good, "--resume", "--seed", "3"],
        "resume on another corpus": ["--data", good, "--resume", "--epochs", "3"],
    }


def test_bad_input_fails_in_one_line_and_leaves_the_run_untouched(
    tmp_path: Path, existing_run: tuple[Path, dict[str, bytes]]
) -> None:
    out, before = existing_run
    for case, args in bad_corpora(tmp_path / "corpora").items():
        result = run_cli(*args, "--out", out)
        assert result.returncode != 0, case
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (case, result.stderr)
        assert lines[0].startswith("error: "), (case, result.stderr)
        assert {name: (out / name).read_bytes() for name in RUN_FILES} == before, case
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")], case  # temp files


def test_resume_needs_a_checkpoint(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Recipe for Tea | Boil water.\n")
    result = run_cli("--data", corpus, "--out", tmp_path / "fresh", "--resume")
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error: checkpoint not found")
    assert not (tmp_path / "fresh").exists()


def test_cli_trains_then_resumes_to_more_epochs(
    tmp_path: Path, epicurious_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--data", str(epicurious_path), "--out", str(tmp_path), "--max-recipes", "64"]
    assert main([*common, "--preset", "tiny", "--epochs", "1", "--batch-size", "8"]) == 0
    assert "world size 1" in capsys.readouterr().err
    assert (
        main(["--data", str(epicurious_path), "--out", str(tmp_path), "--resume", "--epochs", "2"])
        == 0
    )
    err = capsys.readouterr().err
    assert "resuming after epoch 1" in err
    assert "epoch 2/2" in err
    assert "epoch 1/2" not in err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["epochs"]] == [1, 2]
