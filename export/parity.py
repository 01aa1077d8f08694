"""Torch vs onnxruntime checks, run before a bundle is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from export.onnx_export import ExportError
from simmer.tokenizer import Tokenizer
from training.model import RecipeLSTM

PARITY_TOL = 1e-4


def _torch_last(model: RecipeLSTM, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        logits, (hn, cn) = model(torch.from_numpy(tokens), (torch.from_numpy(h), torch.from_numpy(c)))
    return logits[:, -1].numpy(), hn.numpy(), cn.numpy()


def run_parity(model: RecipeLSTM, onnx_path: Path, tokenizer: Tokenizer) -> dict[str, Any]:
    """Max abs differences between torch and onnxruntime; raises ExportError past tolerance."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    config = model.config
    rng = np.random.default_rng(0)
    worst = 0.0
    for batch, seq in ((1, 1), (3, 7), (8, 32)):
        tokens = rng.integers(0, config.vocab_size, (batch, seq), dtype=np.int64)
        h = rng.standard_normal((config.num_layers, batch, config.hidden_size)).astype(np.float32) * 0.5
        c = rng.standard_normal((config.num_layers, batch, config.hidden_size)).astype(np.float32) * 0.5
        expected = _torch_last(model, tokens, h, c)
        got = session.run(None, {"tokens": tokens, "h0": h, "c0": c})
        worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(expected, got, strict=True)))
    if worst > PARITY_TOL:
        raise ExportError(f"parity failed: torch and onnxruntime differ by {worst:.2e} > {PARITY_TOL:g}")
    return {"max_abs_logits_state": worst, "tolerance": PARITY_TOL}
