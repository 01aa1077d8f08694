"""The evaluation command: training's validation loss from the bundle and the checkpoint,
the report's fields, the sample metrics on hand-made sequences, one-line failures."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from simmer.tokenizer import PAD_ID
from training.evaluate import (
    REPEAT_TEMPERATURE,
    STOP_TEMPERATURE,
    Report,
    Sample,
    SamplingOptions,
    State,
    bundle_train_config,
    distinct_n,
    draw_samples,
    evaluate,
    main,
    open_bundle,
    open_checkpoint,
    repeat_rate,
    split_settings,
    split_windows,
    stop_share,
)

ROOT = Path(__file__).resolve().parents[2]
FEW = SamplingOptions(samples=8, max_tokens=40, seed=3)
ONNX_TOL = 1e-4  # float32 onnxruntime, stepped one token at a time, vs torch in one pass
TORCH_TOL = 1e-5  # the same torch model in other batch sizes


@pytest.fixture(scope="module")
def bundle_report(tiny_bundle: Path, epicurious_path: Path) -> Report:
    model, tokenizer, record, bundle = open_bundle(str(tiny_bundle))
    settings = split_settings(*bundle_train_config(bundle))
    return evaluate(model, tokenizer, record, epicurious_path, settings, options=FEW)


@pytest.fixture(scope="module")
def checkpoint_report(tiny_run: Path, epicurious_path: Path) -> Report:
    model, tokenizer, record, payload = open_checkpoint(str(tiny_run))
    settings = split_settings(payload["train_config"], "the checkpoint")
    return evaluate(model, tokenizer, record, epicurious_path, settings, options=FEW)


def validation_record(run: Path, epoch: int | None) -> dict[str, Any]:
    """The run's metrics for the epoch its best.pt holds."""
    epochs = json.loads((run / "metrics.json").read_text())["epochs"]
    return next(e for e in epochs if e["epoch"] == epoch)


# ---------------------------------------------------------------------------- losses
@pytest.mark.parametrize(
    ("report_name", "tolerance"), [("bundle", ONNX_TOL), ("checkpoint", TORCH_TOL)]
)
def test_loss_matches_the_training_runs_validation_loss(
    request: pytest.FixtureRequest, tiny_run: Path, report_name: str, tolerance: float
) -> None:
    report: Report = request.getfixturevalue(f"{report_name}_report")
    recorded = validation_record(tiny_run, report.model.epoch)
    assert report.losses.loss == pytest.approx(recorded["val_loss"], abs=tolerance)
    assert report.losses.loss_words == pytest.approx(recorded["val_loss_words"], abs=tolerance)
    assert report.losses.loss_unmasked == pytest.approx(
        recorded["val_loss_unmasked"], abs=tolerance
    )


def test_the_default_split_is_the_training_runs_validation_split(bundle_report: Report) -> None:
    data = bundle_report.data
    assert data.split == "validation"
    assert (data.corpus_texts, data.texts, data.seq_len) == (300, 30, 48)  # tiny, 300 recipes
    assert "source checkpoint" in data.settings_from
    assert data.split_verified


def test_another_split_seed_is_caught_by_the_tokenizer_check(
    tiny_run: Path, epicurious_path: Path
) -> None:
    _, tokenizer, _, payload = open_checkpoint(str(tiny_run))
    settings = split_settings(payload["train_config"], "the checkpoint", seed=7)
    _, record = split_windows(epicurious_path, tokenizer, "validation", settings)
    assert record.seed == 7 and "overridden: seed" in record.settings_from
    assert not record.split_verified


def test_bundle_and_checkpoint_agree(bundle_report: Report, checkpoint_report: Report) -> None:
    b, c = bundle_report, checkpoint_report
    assert b.data == replace(c.data, settings_from=b.data.settings_from)
    for field in ("loss", "loss_words", "loss_unmasked"):
        assert getattr(b.losses, field) == pytest.approx(getattr(c.losses, field), abs=ONNX_TOL)
    assert b.losses.loss_stop == pytest.approx(c.losses.loss_stop, abs=10 * ONNX_TOL)
    assert (b.losses.word_targets, b.losses.stop_targets) == (
        c.losses.word_targets,
        c.losses.stop_targets,
    )
    # The same seed draws the same tokens unless a float32 difference moves one draw
    # across a boundary, so the sample metrics agree closely rather than exactly.
    for key, run in b.sampling.items():
        other = c.sampling[key]
        assert run.stop_share == pytest.approx(other.stop_share, abs=0.25)
        assert run.distinct_2 == pytest.approx(other.distinct_2, abs=0.1)
        assert run.repeat_rate == pytest.approx(other.repeat_rate, abs=0.1)


# ---------------------------------------------------------------------------- the report
def test_json_report_has_every_field_in_range(
    tiny_bundle: Path, epicurious_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    argv = ["--bundle", str(tiny_bundle), "--data", str(epicurious_path), "--json", str(out)]
    assert main([*argv, "--samples", "6", "--max-tokens", "30", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "loss" in printed and "distinct-2" in printed and "repeat rate" in printed

    report = json.loads(out.read_text())
    assert set(report) == {
        "model",
        "data",
        "losses",
        "prompt",
        "max_tokens",
        "seed",
        "repeat_window",
        "sampling",
        "seconds",
    }
    assert report["model"]["kind"] == "bundle" and report["model"]["version"]
    assert (report["max_tokens"], report["seed"], report["repeat_window"]) == (30, 1, 8)
    losses = report["losses"]
    for name in ("loss", "loss_words", "loss_stop", "loss_unmasked"):
        assert math.isfinite(losses[name]) and losses[name] > 0, name
    assert losses["perplexity"] == pytest.approx(math.exp(losses["loss"]))
    assert losses["perplexity_words"] == pytest.approx(math.exp(losses["loss_words"]))
    assert losses["word_targets"] > 0 and 0 < losses["stop_targets"] <= report["data"]["texts"]
    assert set(report["sampling"]) == {str(STOP_TEMPERATURE), str(REPEAT_TEMPERATURE)}
    for key, run in report["sampling"].items():
        assert run["temperature"] == float(key) and run["samples"] == 6
        assert 0 <= run["stopped"] <= 6 and run["stop_share"] == run["stopped"] / 6
        assert 0 <= run["mean_words"] <= 30
        for share in ("stop_share", "distinct_2", "repeat_rate"):
            assert 0 <= run[share] <= 1, share
        assert run["examples"] and all(e.startswith("recipe for") for e in run["examples"])


# ---------------------------------------------------------------------------- metrics
def test_stop_share_counts_samples_that_drew_the_stop_token() -> None:
    samples = [
        Sample((5, 6), True),
        Sample((5, 6, 7), False),
        Sample((), True),
        Sample((9,), False),
    ]
    assert stop_share(samples) == 0.5
    with pytest.raises(ValueError, match="no samples"):
        stop_share([])


def test_distinct_2_is_distinct_bigrams_over_all_bigrams_of_all_samples() -> None:
    assert distinct_n([[1, 2, 3, 4]]) == 1.0
    assert distinct_n([[1, 2, 1, 2, 1]]) == 0.5  # (1,2) (2,1) (1,2) (2,1)
    assert distinct_n([[1, 2, 3], [1, 2, 3]]) == 0.5  # bigrams pooled across samples
    assert distinct_n([[7, 7, 7, 7]]) == pytest.approx(1 / 3)
    assert distinct_n([[1], []]) is None


def test_repeat_rate_counts_windows_seen_earlier_in_the_same_sample() -> None:
    once = list(range(2, 12))
    assert repeat_rate([once], window=8) == 0.0
    # a 9-word loop: each window after the first cycle repeats one 9 words earlier
    loop = list(range(2, 11)) * 3  # 27 words, 20 windows, the first 9 new
    assert repeat_rate([loop], window=8) == pytest.approx(11 / 20)
    assert repeat_rate([[3] * 10], window=8) == pytest.approx(2 / 3)  # overlapping repeats
    # a window seen in another sample is not a repeat
    assert repeat_rate([once, once], window=8) == 0.0
    assert repeat_rate([[1, 2, 3]], window=8) is None


class CountdownModel:
    """Row i draws word 2 exactly i times, then the stop token (state: row, draws)."""

    def zero_state(self, batch: int) -> State:
        h = np.zeros((1, batch, 2), np.float32)
        h[0, :, 0] = np.arange(batch)
        return h, h.copy()

    def step(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, State]:
        h = h.copy()
        if tokens.shape[1] == 1:  # a drawn word fed back (the prompt is longer)
            h[0, :, 1] += 1
        logits = np.full((tokens.shape[0], 4), -1e9, np.float32)
        done = h[0, :, 1] >= h[0, :, 0]
        logits[done, PAD_ID] = 0.0
        logits[~done, 2] = 0.0
        return logits, (h, h.copy())

    def score(self, windows: np.ndarray) -> torch.Tensor:
        raise NotImplementedError


def test_samples_stop_on_the_stop_token_within_the_token_budget() -> None:
    advanced: list[int] = []
    samples = draw_samples(
        CountdownModel(), [2, 3], 5, 3, 1.0, torch.Generator().manual_seed(0), advanced.append
    )
    assert [s.words for s in samples] == [(), (2,), (2, 2), (2, 2, 2), (2, 2, 2)]
    assert [s.stopped for s in samples] == [True, True, True, False, False]
    assert stop_share(samples) == 0.6
    assert sum(advanced) == 5 * 3  # the progress bar ends at its total


# ---------------------------------------------------------------------------- failures
def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training.evaluate", *map(str, args)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_command_exits_non_zero_with_one_line_on_a_missing_file(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    result = run_cli("--bundle", tiny_bundle, "--data", tmp_path / "absent.json")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: corpus file not found: {tmp_path / 'absent.json'}"
    ]
    assert result.stdout == ""


def bad_inputs(folder: Path, bundle: Path, data: Path) -> dict[str, list[str]]:
    broken = folder / "broken-bundle"
    shutil.copytree(bundle, broken)
    (broken / "model.onnx").write_bytes(b"not a graph")
    malformed = folder / "malformed.json"
    malformed.write_text('[{"title": "Tea", "directions": ["Boil water."]')
    return {
        "missing bundle": ["--bundle", str(folder / "absent"), "--data", str(data)],
        "missing checkpoint": ["--checkpoint", str(folder / "absent.pt"), "--data", str(data)],
        "invalid bundle": ["--bundle", str(broken), "--data", str(data)],
        "malformed corpus": ["--bundle", str(bundle), "--data", str(malformed)],
        "no samples": ["--bundle", str(bundle), "--data", str(data), "--samples", "0"],
        "seed past 64 bits": ["--bundle", str(bundle), "--data", str(data), "--seed", str(2**64)],
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing bundle",
        "missing checkpoint",
        "invalid bundle",
        "malformed corpus",
        "no samples",
        "seed past 64 bits",
    ],
)
def test_bad_input_fails_in_one_line(
    case: str,
    tiny_bundle: Path,
    epicurious_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = bad_inputs(tmp_path, tiny_bundle, epicurious_path)[case]
    assert main([*argv, "--json", str(tmp_path / "report.json")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.out == ""
    assert not (tmp_path / "report.json").exists()
