"""Model -> ONNX step graph with the LSTM state as explicit inputs and outputs."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch
from torch import nn

from export.options import DEFAULT_OPSET
from simmer.bundle import GRAPH_INPUTS
from training.model import LastStepLSTM, LSTMConfig, RecipeLSTM


class ExportError(ValueError):
    """An export that cannot go ahead; the message is one line."""


def weights_hash(model: RecipeLSTM) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_onnx(model: RecipeLSTM, path: str | Path, opset: int = DEFAULT_OPSET) -> None:
    """Write the serving graph: tokens [B, T], h0/c0 [L, B, H] -> logits [B, V], hn, cn.

    Only the last position goes through the output layer: [B, T, V] never exists.
    """
    export_step(LastStepLSTM(model), model.config, path, opset)


STEP_AXES: dict[str, dict[int, str]] = {
    "logits": {0: "batch"},
    "hn": {1: "batch"},
    "cn": {1: "batch"},
}  # LastStepLSTM's outputs and their dynamic axes


def export_step(
    step: nn.Module,
    config: LSTMConfig,
    path: str | Path,
    opset: int,
    outputs: Mapping[str, dict[int, str]] = STEP_AXES,
) -> None:
    """torch.onnx.export of any module with LastStepLSTM's inputs (tokens, h0, c0) and
    `outputs`: output name -> its dynamic axes, in the order the module returns them."""
    tokens = torch.ones((2, 3), dtype=torch.int64)
    h0 = torch.zeros((config.num_layers, 2, config.hidden_size))
    c0 = torch.zeros_like(h0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter warns about itself
            torch.onnx.export(
                step.eval(),
                (tokens, h0, c0),
                str(path),
                input_names=list(GRAPH_INPUTS),
                output_names=list(outputs),
                dynamic_axes={
                    "tokens": {0: "batch", 1: "seq"},
                    "h0": {1: "batch"},
                    "c0": {1: "batch"},
                    **outputs,
                },
                opset_version=opset,
                dynamo=False,  # the TorchScript exporter emits ONNX's native LSTM op
            )
    except Exception as exc:  # the exporter raises many types (unsupported opset, ...)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExportError(f"torch.onnx.export failed at opset {opset}: {reason}") from exc


def check_onnx(path: str | Path) -> None:
    """onnx.checker with shape inference; ExportError with its first line on failure."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(
            f"onnx.checker failed for {Path(path).name}: {str(exc).splitlines()[0]}"
        ) from exc
