"""--quantize int8: a batch-independent graph, checked against its torch twin, and the loss gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic

from export.bundle_writer import build_bundle, quantization_gate
from export.onnx_export import ExportError
from export.options import ExportOptions
from export.parity import STEP_TOL, Reference, check_batch_independence, check_parity, run_checks
from export.quantize import Int8Reference, Int8Weights, quantize_rows, write_int8_graph
from export.runtime import open_session
from export.validation import TextSample, prompts_from
from simmer.bundle import load_bundle
from training.model import RecipeLSTM


def int8_reference(model: RecipeLSTM, weights: Int8Weights) -> Reference:
    twin = Int8Reference(model, weights).eval()
    return Reference(twin, model.config, head=twin.head)


def test_rows_quantise_within_half_a_step_and_zero_rows_stay_zero() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((5, 40)).astype(np.float32)
    weight[2] = 0.0
    q, scale = quantize_rows(weight, 63)
    assert q.dtype == np.int8
    assert np.abs(q).max() == 63
    assert np.all(
        np.abs(q.astype(np.float32) * scale[:, None] - weight) <= scale[:, None] / 2 + 1e-7
    )
    assert not q[2].any()


def test_int8_graph_passes_every_check_against_its_torch_twin(
    tiny_model: RecipeLSTM, tiny_onnx: Path, tiny_sample: TextSample, tmp_path: Path
) -> None:
    weights = Int8Weights.from_model(tiny_model)
    write_int8_graph(tiny_onnx, weights, tmp_path / "int8.onnx")
    checks = run_checks(
        int8_reference(tiny_model, weights),
        open_session(tmp_path / "int8.onnx"),
        tiny_sample.token_lists(),
        prompts_from(tiny_sample),
    )
    assert checks["batch_independence"]["max_abs"] <= STEP_TOL
    assert checks["incremental"]["max_abs"] <= STEP_TOL
    assert checks["greedy"]["identical"] is True


def test_int8_parity_fails_when_the_graph_is_not_its_twin(
    tiny_model: RecipeLSTM, tiny_onnx: Path, tiny_sample: TextSample, tmp_path: Path
) -> None:
    weights = Int8Weights.from_model(tiny_model)
    off = Int8Weights(
        weights.embedding,
        weights.embedding_scale,
        weights.head,
        weights.head_scale * 1.01,
        weights.head_bias,
    )
    write_int8_graph(tiny_onnx, off, tmp_path / "int8.onnx")
    with pytest.raises(ExportError, match="parity failed"):
        check_parity(
            int8_reference(tiny_model, weights),
            open_session(tmp_path / "int8.onnx"),
            tiny_sample.token_lists(),
        )


def test_onnxruntime_quantize_dynamic_fails_batch_independence(
    tiny_model: RecipeLSTM, tiny_onnx: Path, tmp_path: Path
) -> None:
    """Why export/quantize.py exists: one activation scale per tensor couples the rows."""
    quantize_dynamic(tiny_onnx, tmp_path / "dynamic.onnx", weight_type=QuantType.QInt8)
    with pytest.raises(ExportError, match="batch independence failed"):
        check_batch_independence(open_session(tmp_path / "dynamic.onnx"), tiny_model.config)


@pytest.mark.parametrize(
    ("increase", "force", "refused"),
    [(0.03, False, True), (0.03, True, False), (0.02, False, False), (-0.01, False, False)],
)
def test_quantization_gate_refuses_past_the_threshold_unless_forced(
    increase: float, force: bool, refused: bool
) -> None:
    options = ExportOptions(quantize="int8", max_quant_loss_increase=0.02, force=force)
    if refused:
        with pytest.raises(ExportError, match="int8 validation loss"):
            quantization_gate(increase, options)
    else:
        quantization_gate(increase, options)


def test_int8_bundle_records_its_loss_change_speed_and_size(int8_bundle: Path) -> None:
    bundle = load_bundle(int8_bundle)
    manifest = bundle.manifest
    assert bundle.precision == "int8"
    assert bundle.version == f"{manifest['weights_sha256'][:12]}-int8"
    quant = manifest["quantization"]
    assert quant["val_loss_increase"] == pytest.approx(
        quant["val_loss_int8"] - quant["val_loss_fp32"]
    )
    assert quant["val_loss_increase"] <= quant["max_val_loss_increase"] == 0.02
    assert quant["forced"] is False
    assert manifest["validation"]["loss"] == quant["val_loss_int8"]
    for batch in ("1", "256"):
        assert quant["speedup"][batch] == pytest.approx(
            quant["step_ms"]["fp32"][batch] / quant["step_ms"]["int8"][batch]
        )
    assert quant["size_bytes"]["int8"] == (int8_bundle / "model.onnx").stat().st_size
    assert quant["size_bytes"]["int8"] < quant["size_bytes"]["fp32"]
    assert quant["max_abs_logits_vs_fp32"] > 0  # the shipped graph really is quantised
    assert manifest["parity"]["reference"] == "torch int8 twin"
    assert manifest["parity"]["greedy"]["identical"] is True
    assert manifest["parity_fp32"]["greedy"]["identical"] is True


def test_int8_past_the_threshold_is_refused_and_nothing_is_written(
    tiny_checkpoint: Path, epicurious_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "int8"
    (tmp_path / "work").mkdir()
    options = ExportOptions(quantize="int8", data=epicurious_path, max_quant_loss_increase=-1.0)
    with pytest.raises(ExportError, match=r"int8 validation loss is .* worse than fp32"):
        build_bundle(tiny_checkpoint, out, tmp_path / "work", options)
    assert not out.exists()


def test_int8_needs_data_for_its_validation_loss(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--quantize int8 needs --data"):
        build_bundle(tiny_checkpoint, tmp_path / "out", tmp_path, ExportOptions(quantize="int8"))


def test_forced_int8_says_so_in_its_manifest(
    tiny_checkpoint: Path, epicurious_path: Path, tmp_path: Path
) -> None:
    (tmp_path / "work").mkdir()
    options = ExportOptions(
        quantize="int8", data=epicurious_path, max_quant_loss_increase=-1.0, force=True
    )
    build_bundle(tiny_checkpoint, tmp_path / "int8", tmp_path / "work", options)
    quant = json.loads((tmp_path / "int8" / "manifest.json").read_text())["quantization"]
    assert quant["forced"] is True
