"""Fixtures for the export tests: the tiny run's model, its graphs, real text, and bundles."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from export.onnx_export import export_onnx
from export.options import ExportOptions
from export.validation import TextSample, held_out_recipes
from simmer.tokenizer import Tokenizer
from training.checkpoint import load_checkpoint, load_model
from training.model import RecipeLSTM


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run: Path) -> Path:
    return tiny_run / "best.pt"


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path) -> RecipeLSTM:
    return load_model(tiny_checkpoint)[0]


@pytest.fixture(scope="session")
def tiny_sample(tiny_run: Path, tiny_checkpoint: Path, epicurious_path: Path) -> TextSample:
    """The tiny run's held-out Epicurious recipes, tokenised."""
    payload = load_checkpoint(tiny_checkpoint)
    tokenizer = Tokenizer.load(tiny_run / "tokenizer.json")
    return held_out_recipes(epicurious_path, payload, tokenizer, limit=32)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_model: RecipeLSTM) -> Path:
    path = tmp_path_factory.mktemp("graphs") / "fp32.onnx"
    export_onnx(tiny_model, path)
    return path


@pytest.fixture
def perturbed(tiny_model: RecipeLSTM) -> Callable[[float], RecipeLSTM]:
    """A copy of the tiny model with every LSTM recurrent weight moved by `delta`."""

    def make(delta: float) -> RecipeLSTM:
        model = copy.deepcopy(tiny_model)
        with torch.no_grad():
            for name, weight in model.lstm.named_parameters():
                if name.startswith("weight_hh"):
                    weight.add_(delta)
        return model

    return make


@pytest.fixture(scope="session")
def data_bundle(
    tmp_path_factory: pytest.TempPathFactory, tiny_run: Path, epicurious_path: Path
) -> Path:
    """The tiny run exported through the CLI with --data: the real entry point."""
    from export.__main__ import main

    out = tmp_path_factory.mktemp("bundles") / "with-data"
    assert (
        main(["--checkpoint", str(tiny_run), "--out", str(out), "--data", str(epicurious_path)])
        == 0
    )
    return out


@pytest.fixture(scope="session")
def int8_bundle(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, epicurious_path: Path
) -> Path:
    from export.bundle_writer import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "int8"
    options = ExportOptions(quantize="int8", data=epicurious_path)
    build_bundle(tiny_checkpoint, out, tmp_path_factory.mktemp("work"), options)
    return out
