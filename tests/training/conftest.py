"""Fixtures for the training job's tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from training.presets import TrainConfig, get_preset

# Enough real recipes that a tiny model's loss moves, few enough for a second's training.
SMALL_CORPUS = 160


@pytest.fixture
def write_json(tmp_path: Path) -> Callable[[str, Any], Path]:
    """Write an object as JSON under tmp_path and return the path."""

    def write(name: str, obj: Any) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(obj), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def small_texts(epicurious_path: Path) -> list[str]:
    """The first 160 Epicurious recipes in the book's text format (read, never copied)."""
    from training.data import load_corpus

    return load_corpus(epicurious_path, SMALL_CORPUS)


@pytest.fixture
def tiny_config() -> TrainConfig:
    """The tiny preset with a schedule and dropout, so resuming must restore both."""
    return get_preset("tiny").with_overrides(
        epochs=2, max_recipes=SMALL_CORPUS, dropout=0.2, warmup_steps=3, min_lr_ratio=0.1
    )
