"""build_bundle: what the manifest records, and a bundle that appears whole or not at all."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import pytest

import export.bundle_writer as bundle_writer
from export.onnx_export import ExportError, export_onnx, weights_hash
from export.parity import PARITY_TOL, STEP_TOL
from simmer.bundle import BundleError, load_bundle, sha256_file
from training.model import RecipeLSTM


def manifest_of(bundle: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((bundle / "manifest.json").read_text())
    return data


def tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_manifest_records_the_model_its_versions_and_every_hash(
    data_bundle: Path, tiny_model: RecipeLSTM
) -> None:
    manifest = manifest_of(data_bundle)
    digest = weights_hash(tiny_model)
    assert manifest["name"] == "simmer-lstm"
    assert manifest["weights_sha256"] == digest
    assert manifest["version"] == digest[:12]
    config = tiny_model.config
    assert {
        k: manifest["model"][k]
        for k in ("vocab_size", "embedding_dim", "hidden_size", "num_layers")
    } == {
        "vocab_size": config.vocab_size,
        "embedding_dim": config.embedding_dim,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
    }
    assert (
        manifest["graph"]["opset"]
        == onnx.load(str(data_bundle / "model.onnx")).opset_import[0].version
    )
    assert manifest["graph"]["precision"] == "fp32"
    assert manifest["versions"]["onnx"] == onnx.__version__
    assert manifest["versions"]["onnxruntime"] == ort.__version__
    assert manifest["files"] == {
        name: sha256_file(data_bundle / name) for name in ("model.onnx", "tokenizer.json")
    }


def test_manifest_training_summary_comes_from_the_run(data_bundle: Path, tiny_run: Path) -> None:
    epochs = json.loads((tiny_run / "metrics.json").read_text())["epochs"]
    summary = manifest_of(data_bundle)["training"]
    best = min(epochs, key=lambda e: e["val_loss"])
    assert summary["epochs"] == len(epochs)
    assert summary["final_val_loss"] == epochs[-1]["val_loss"]
    assert summary["final_val_perplexity"] == epochs[-1]["val_perplexity"]
    assert summary["best_val_loss"] == best["val_loss"]
    assert summary["best_val_perplexity"] == pytest.approx(math.exp(best["val_loss"]))


def test_graph_scores_the_held_out_recipes_like_training_did(
    data_bundle: Path, tiny_run: Path
) -> None:
    """All of the tiny run's validation recipes fit in --val-recipes, so stepping the graph one
    token at a time must reproduce the validation loss the training job computed in torch."""
    validation = manifest_of(data_bundle)["validation"]
    best = json.loads((tiny_run / "metrics.json").read_text())["best_val_loss"]
    assert validation["source"] == "data"
    assert validation["held_out"] is True
    assert validation["loss"] == pytest.approx(best, abs=1e-4)
    assert validation["perplexity"] == pytest.approx(math.exp(validation["loss"]))


def test_manifest_records_the_checks_and_the_optimisation_choice(data_bundle: Path) -> None:
    manifest = manifest_of(data_bundle)
    parity = manifest["parity"]
    assert parity["text"] == "data"
    assert parity["torch_vs_onnxruntime"]["max_abs_logits_text"] <= PARITY_TOL
    assert parity["torch_vs_onnxruntime"]["max_abs_state_random"] <= PARITY_TOL
    assert parity["incremental"]["max_abs"] <= STEP_TOL
    assert parity["batch_independence"]["max_abs"] <= STEP_TOL
    assert parity["greedy"]["identical"] is True
    runtime = manifest["runtime"]
    assert runtime["graph_optimization"] in ("online", "offline")
    assert runtime["session_graph_optimization_level"] == "ORT_ENABLE_ALL"
    for measured in runtime["measured"].values():
        assert set(measured["step_ms"]) == {"1", "256"}
        assert all(ms > 0 for ms in measured["step_ms"].values())


def test_without_data_parity_uses_vocabulary_sentences(tiny_bundle: Path) -> None:
    manifest = manifest_of(tiny_bundle)
    assert manifest["parity"]["text"] == "vocabulary"
    assert manifest["validation"] == {"source": "vocabulary", "texts": 16}


def test_failed_export_leaves_the_existing_bundle_as_it_was(
    tiny_bundle: Path,
    tiny_checkpoint: Path,
    perturbed: Callable[[float], RecipeLSTM],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    for name, data in tree(tiny_bundle).items():
        (out / name).write_bytes(data)
    before = tree(out)

    def export_other_weights(model: RecipeLSTM, path: Path, opset: int = 17) -> None:
        export_onnx(perturbed(1e-3), path, opset)

    monkeypatch.setattr(bundle_writer, "export_onnx", export_other_weights)
    with pytest.raises(ExportError, match="parity failed"):
        bundle_writer.build_bundle(tiny_checkpoint, out, tmp_path_factory.mktemp("work"))
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging left behind
    load_bundle(out)


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_existing_non_bundle_is_refused_and_untouched(
    kind: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "precious"
    if kind == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    else:
        out.write_text("keep me")
    before = out.read_text() if kind == "file" else tree(out)
    with pytest.raises(BundleError, match="refusing to overwrite"):
        bundle_writer.build_bundle(tiny_checkpoint, out, tmp_path / "unused")
    assert (out.read_text() if kind == "file" else tree(out)) == before
