"""Training runs: the loss falls, the checkpoint contract holds, runs repeat and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from simmer.tokenizer import Tokenizer
from training.checkpoint import load_checkpoint, load_model
from training.model import LSTMConfig, RecipeLSTM
from training.presets import TrainConfig
from training.train import train

EPOCH_METRICS = (
    "train_loss",
    "train_loss_unmasked",
    "val_loss",
    "val_loss_unmasked",
    "val_loss_words",
    "val_perplexity",
    "tokens_per_s",
    "seconds",
)


def test_tiny_run_loss_falls_below_uniform(tiny_run: Path) -> None:
    history = json.loads((tiny_run / "metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2]
    uniform = math.log(Tokenizer.load(tiny_run / "tokenizer.json").vocab_size)
    assert history[0]["train_loss"] < uniform
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert history[1]["val_loss"] < history[0]["val_loss"] < uniform
    for record in history:
        assert set(EPOCH_METRICS) <= set(record)
        assert record["val_perplexity"] == pytest.approx(math.exp(record["val_loss"]))
        assert set(record["samples"]) == {"1.0", "0.2"}
        assert all(text.startswith("recipe for") for text in record["samples"].values())


def test_checkpoints_keep_the_export_contract(tiny_run: Path) -> None:
    # read raw, not through load_checkpoint; weights_only: the files need no unpickling
    latest = torch.load(tiny_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    best = torch.load(tiny_run / "best.pt", map_location="cpu", weights_only=True)
    for payload in (latest, best):
        assert payload["format"] == "simmer-checkpoint"
        assert payload["format_version"] == 1
        assert payload["tokenizer_file"] == "tokenizer.json"
        assert {"optimizer_state", "train_config", "epoch", "history"} <= set(payload)
        model = RecipeLSTM(LSTMConfig.from_dict(payload["model_config"]))
        model.load_state_dict(payload["model_state"])
        tokenizer = Tokenizer.load(tiny_run / payload["tokenizer_file"])
        assert tokenizer.vocab_size == model.config.vocab_size
    assert latest["epoch"] == 2 == len(latest["history"])
    val_losses = [h["val_loss"] for h in latest["history"]]
    assert best["history"][-1]["val_loss"] == min(val_losses)


def test_loss_plot_is_written(tiny_run: Path) -> None:
    png = (tiny_run / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 1000


def state_of(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = load_checkpoint(path)["model_state"]
    return state


def test_same_seed_gives_identical_weights_on_cpu(
    tmp_path: Path, small_texts: list[str], tiny_config: TrainConfig
) -> None:
    config = tiny_config.with_overrides(epochs=1)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        train(small_texts, config.with_overrides(seed=seed), tmp_path / name)
    a, b, c = (state_of(tmp_path / name / "checkpoint.pt") for name in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


class Interrupt(Exception):
    """Stands in for a crash or Ctrl-C in the middle of an epoch."""


def test_resume_continues_from_the_saved_epoch_exactly(
    tmp_path: Path, small_texts: list[str], tiny_config: TrainConfig
) -> None:
    train(small_texts, tiny_config, tmp_path / "straight")

    seen_epoch_starts = 0

    def crash_in_second_epoch(batch: int, total: int, stats: dict[str, float]) -> None:
        nonlocal seen_epoch_starts
        seen_epoch_starts += batch == 1
        if seen_epoch_starts == 2 and batch == 3:
            raise Interrupt

    broken = tmp_path / "broken"
    with pytest.raises(Interrupt):
        train(small_texts, tiny_config, broken, crash_in_second_epoch)
    saved = load_checkpoint(broken / "checkpoint.pt")
    assert saved["epoch"] == 1

    result = train(small_texts, tiny_config, broken, resume=saved)
    assert [h["epoch"] for h in result.history] == [1, 2]
    resumed, straight = (
        state_of(broken / "checkpoint.pt"),
        state_of(tmp_path / "straight" / "checkpoint.pt"),
    )
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    metrics: dict[str, Any] = json.loads((broken / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["epochs"]] == [1, 2]


def test_resume_refuses_another_corpus_or_split(
    tmp_path: Path, small_texts: list[str], tiny_config: TrainConfig
) -> None:
    from training.checkpoint import CheckpointError

    train(small_texts, tiny_config.with_overrides(epochs=1), tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="corpus differs"):
        train(small_texts[:-1], tiny_config, tmp_path, resume=saved)
    with pytest.raises(CheckpointError, match="seed, seq_len differ"):
        train(small_texts, tiny_config.with_overrides(seed=7, seq_len=40), tmp_path, resume=saved)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_loaded_best_model_predicts_like_it_was_saved(tiny_run: Path) -> None:
    model, payload = load_model(tiny_run / "best.pt")
    again = RecipeLSTM(LSTMConfig.from_dict(payload["model_config"]))
    again.load_state_dict(payload["model_state"])
    tokens = torch.tensor([[2, 3, 4, 5]])
    torch.testing.assert_close(model(tokens)[0], again.eval()(tokens)[0])


def test_tail_windows_and_a_stop_weight_train_and_report_every_validation_loss(
    tmp_path: Path,
    small_texts: list[str],
    tiny_config: TrainConfig,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tiny_config.with_overrides(epochs=1, tail_windows=True, stop_weight=2.0)
    result = train(small_texts, config, tmp_path)
    assert "tail windows" in capsys.readouterr().err
    record = result.history[0]
    assert record["train_loss_unmasked"] is None  # the output layer ran at counted targets only
    assert record["val_loss_unmasked"] is not None
    assert record["val_loss"] < math.log(Tokenizer.load(tmp_path / "tokenizer.json").vocab_size)
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
