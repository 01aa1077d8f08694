"""Checkpoint -> checked bundle: export, run the parity checks, write atomically."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch

from export.onnx_export import DEFAULT_OPSET, ExportError, export_onnx, load_checkpoint, weights_hash
from export.parity import run_parity
from simmer.bundle import MODEL, TOKENIZER, write_bundle
from simmer.tokenizer import Tokenizer, TokenizerError


def training_summary(payload: dict[str, Any]) -> dict[str, Any]:
    history = payload.get("history") or []
    vals = [h["val_loss"] for h in history if h.get("val_loss") is not None]
    last = history[-1] if history else {}
    return {
        "epochs": len(history),
        "final_val_loss": last.get("val_loss"),
        "final_val_perplexity": last.get("val_perplexity"),
        "final_val_loss_words": last.get("val_loss_words"),
        "best_val_loss": min(vals) if vals else None,
        "best_val_perplexity": min(h["val_perplexity"] for h in history if h.get("val_perplexity"))
        if vals
        else None,
        "final_train_loss": last.get("train_loss"),
    }


def build_bundle(
    checkpoint: Path, out: Path, work: Path, opset: int | None = None
) -> dict[str, Any]:
    model, payload = load_checkpoint(checkpoint)
    tokenizer_path = checkpoint.parent / payload.get("tokenizer_file", TOKENIZER)
    try:
        tokenizer = Tokenizer.load(tokenizer_path)
    except TokenizerError as exc:
        raise ExportError(str(exc)) from exc
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ExportError(
            f"tokenizer has {tokenizer.vocab_size} words but the model {model.config.vocab_size}"
        )
    onnx_path = work / MODEL
    opset = opset or DEFAULT_OPSET
    export_onnx(model, onnx_path, opset=opset)
    try:
        onnx.checker.check_model(str(onnx_path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker failed: {str(exc).splitlines()[0]}") from exc
    parity = run_parity(model, onnx_path, tokenizer)
    digest = weights_hash(model)
    config = model.config
    manifest: dict[str, Any] = {
        "name": "simmer-lstm",
        "version": digest[:12],
        "weights_sha256": digest,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "architecture": "embedding-lstm-linear",
            "vocab_size": config.vocab_size,
            "embedding_dim": config.embedding_dim,
            "hidden_size": config.hidden_size,
            "num_layers": config.num_layers,
            "parameters": model.num_parameters(),
        },
        "graph": {
            "opset": opset,
            "inputs": {"tokens": "int64[batch,seq]", "h0": "float32[layers,batch,hidden]",
                       "c0": "float32[layers,batch,hidden]"},
            "outputs": {"logits": "float32[batch,vocab]", "hn": "float32[layers,batch,hidden]",
                        "cn": "float32[layers,batch,hidden]"},
            "precision": "fp32",
        },
        "versions": {
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "training": training_summary(payload),
        "parity": parity,
    }
    write_bundle(out, {MODEL: onnx_path, TOKENIZER: tokenizer_path}, manifest)
    return json.loads((out / "manifest.json").read_text())
