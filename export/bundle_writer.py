"""Checkpoint -> checked bundle: export, optimise, quantise, run the checks, build the graphs
the service runs besides the model (`export.graphs`, `export.scoring`), write atomically."""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.graphs import build_graphs, check_graphs, manifest_entries
from export.onnx_export import ExportError, check_onnx, export_onnx, weights_hash
from export.options import ExportOptions
from export.parity import Reference, run_checks, run_graph, text_batch, zero_state
from export.quantize import Int8Reference, Int8Weights, write_int8_graph
from export.runtime import choose_graph_optimization, open_session, step_times
from export.scoring import build_scoring, check_scoring
from export.validation import (
    TextSample,
    graph_loss,
    held_out_recipes,
    perplexity,
    prompts_from,
    vocabulary_sentences,
)
from simmer.bundle import (
    MANIFEST,
    MODEL,
    SEQUENCE_LOGPROBS,
    TOKENIZER,
    check_replaceable,
    sha256_file,
    write_bundle,
)
from training.checkpoint import load_model, load_tokenizer
from training.model import RecipeLSTM


@dataclass(frozen=True)
class CheckedGraph:
    """A graph that passed every check, as it will be shipped, and the torch model it was
    checked against."""

    path: Path
    runtime: dict[str, Any]
    checks: dict[str, Any]
    reference: Reference


def log(message: str) -> None:
    print(f"export: {message}", file=sys.stderr, flush=True)


def training_summary(payload: dict[str, Any], metrics_path: Path) -> dict[str, Any]:
    """Final and best validation loss and perplexity of the run the checkpoint comes from.

    best.pt's history stops at its own epoch; the run's metrics.json, when it sits beside
    the checkpoint and agrees with that history, has the epochs after it too.
    """
    history = list(payload.get("history") or [])
    try:
        epochs = json.loads(metrics_path.read_text(encoding="utf-8"))["epochs"]
        losses = [e["val_loss"] for e in epochs]
    except (OSError, ValueError, TypeError, KeyError):  # no readable metrics.json
        epochs, losses = [], []
    if losses[: len(history)] == [h.get("val_loss") for h in history] and len(losses) > len(
        history
    ):
        history = epochs
    scored = [h for h in history if h.get("val_loss") is not None]
    best = min(scored, key=lambda h: h["val_loss"]) if scored else {}
    last = history[-1] if history else {}
    return {
        "epochs": len(history),
        "exported_epoch": payload.get("epoch"),
        "final_val_loss": last.get("val_loss"),
        "final_val_perplexity": last.get("val_perplexity"),
        "best_val_loss": best.get("val_loss"),
        "best_val_perplexity": best.get("val_perplexity"),
        "best_epoch": best.get("epoch"),
        "final_train_loss": last.get("train_loss"),
    }


def check_graph_file(
    raw: Path, reference: Reference, sample: TextSample, work: Path
) -> CheckedGraph:
    """onnx.checker, the optimisation choice, then every parity check on the chosen file."""
    check_onnx(raw)
    path, runtime = choose_graph_optimization(raw, reference.config, work)
    if path != raw:
        check_onnx(path)
    checks = run_checks(reference, open_session(path), sample.token_lists(), prompts_from(sample))
    return CheckedGraph(path, runtime, checks, reference)


def quantization_gate(loss_increase: float, options: ExportOptions) -> None:
    """Refuse an int8 graph whose validation loss worsens past the threshold, unless forced."""
    if loss_increase > options.max_quant_loss_increase and not options.force:
        raise ExportError(
            f"int8 validation loss is {loss_increase:+.4f} worse than fp32, more than "
            f"{options.max_quant_loss_increase:g}; use --force or raise --max-quant-loss-increase"
        )


def build_int8(
    model: RecipeLSTM,
    weights: Int8Weights,
    fp32: CheckedGraph,
    fp32_raw: Path,
    sample: TextSample,
    work: Path,
    options: ExportOptions,
) -> tuple[CheckedGraph, dict[str, Any]]:
    config = model.config
    raw = work / "int8.onnx"
    write_int8_graph(fp32_raw, weights, raw)
    quantized = Int8Reference(model, weights).eval()
    int8 = check_graph_file(raw, Reference(quantized, config, head=quantized.head), sample, work)
    log("int8 graph passed its checks; scoring validation loss")
    sessions = {"fp32": open_session(fp32.path), "int8": open_session(int8.path)}
    losses = {
        name: graph_loss(session, sample.windows, config.num_layers, config.hidden_size)
        for name, session in sessions.items()
    }
    tokens = text_batch(sample.token_lists(), 16, 40)
    logits = {
        name: run_graph(session, tokens, *zero_state(config, len(tokens)))[0]
        for name, session in sessions.items()
    }
    increase = losses["int8"] - losses["fp32"]
    quantization_gate(increase, options)
    steps = step_times({"fp32": fp32.path, "int8": int8.path}, config)
    record = {
        "method": "dynamic int8: output-layer input per row at run time, 7-bit weights per word; "
        "embedding int8 per word; LSTM fp32",
        "val_loss_fp32": losses["fp32"],
        "val_loss_int8": losses["int8"],
        "val_loss_increase": increase,
        "max_abs_logits_vs_fp32": float(np.abs(logits["int8"] - logits["fp32"]).max()),
        "max_val_loss_increase": options.max_quant_loss_increase,
        "forced": options.force and increase > options.max_quant_loss_increase,
        "step_ms": steps,
        "speedup": {b: steps["fp32"][b] / steps["int8"][b] for b in steps["fp32"]},
        "size_bytes": {"fp32": fp32.path.stat().st_size, "int8": int8.path.stat().st_size},
    }
    return int8, record


def build_bundle(
    checkpoint: Path, out: Path, work: Path, options: ExportOptions | None = None
) -> dict[str, Any]:
    """Export `checkpoint`, check it, and write the bundle at `out`; returns the manifest.

    Raises CheckpointError for a checkpoint (or its tokenizer) that cannot be loaded
    safely, ExportError for an export that cannot go ahead (a failed check, say) and
    BundleError for an `out` that may not be replaced; each message is one line.
    """
    options = options or ExportOptions()
    check_replaceable(out)  # before any work, and again when the bundle is written
    model, payload = load_model(checkpoint)
    config = model.config
    tokenizer = load_tokenizer(checkpoint, payload)
    if tokenizer.vocab_size != config.vocab_size:
        raise ExportError(
            f"tokenizer has {tokenizer.vocab_size} words but the model {config.vocab_size}"
        )
    if options.quantize == "int8" and options.data is None:
        raise ExportError(
            "--quantize int8 needs --data: the validation loss decides whether int8 is kept"
        )

    if options.data is not None:
        sample = held_out_recipes(options.data, payload, tokenizer, options.val_recipes)
    else:
        sample = vocabulary_sentences(tokenizer)
    fp32_raw = work / "fp32.onnx"
    export_onnx(model, fp32_raw, opset=options.opset)
    log(f"exported {config.vocab_size}-word model at opset {options.opset}; checking it")
    fp32 = check_graph_file(fp32_raw, Reference(model, config), sample, work)
    log("fp32 graph passed its checks")

    shipped, quantization, int8 = fp32, None, None
    if options.quantize == "int8":
        int8 = Int8Weights.from_model(model)
        shipped, quantization = build_int8(model, int8, fp32, fp32_raw, sample, work, options)
    validation = dict(sample.record)
    if quantization is not None:
        validation["loss"] = quantization["val_loss_int8"]
    elif options.data is not None:
        session = open_session(fp32.path)
        validation["loss"] = graph_loss(
            session, sample.windows, config.num_layers, config.hidden_size
        )
    if "loss" in validation:
        validation["perplexity"] = perplexity(validation["loss"])

    graphs = build_graphs(shipped.path, config.vocab_size)
    graph_checks = check_graphs(graphs, shipped.path, config)
    log(f"the other graphs passed their checks: {', '.join(graphs)}")
    scoring = build_scoring(model, work, options.opset, int8)
    scoring_checks = check_scoring(scoring, shipped.reference, shipped.path, sample.token_lists())
    graphs[SEQUENCE_LOGPROBS] = scoring
    log(f"{SEQUENCE_LOGPROBS} passed its checks")

    digest = weights_hash(model)
    precision = options.quantize or "fp32"
    manifest: dict[str, Any] = {
        "name": "simmer-lstm",
        "version": digest[:12] if precision == "fp32" else f"{digest[:12]}-{precision}",
        "weights_sha256": digest,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": sha256_file(checkpoint),
            "epoch": payload.get("epoch"),
        },
        "model": {
            "architecture": "embedding-lstm-linear",
            "vocab_size": config.vocab_size,
            "embedding_dim": config.embedding_dim,
            "hidden_size": config.hidden_size,
            "num_layers": config.num_layers,
            "parameters": model.num_parameters(),
        },
        "graph": {
            "opset": options.opset,
            "precision": precision,
            "inputs": {
                "tokens": "int64[batch,seq]",
                "h0": "float32[layers,batch,hidden]",
                "c0": "float32[layers,batch,hidden]",
            },
            "outputs": {
                "logits": "float32[batch,vocab] (last position only)",
                "hn": "float32[layers,batch,hidden]",
                "cn": "float32[layers,batch,hidden]",
            },
        },
        "versions": {
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "training": training_summary(payload, checkpoint.parent / "metrics.json"),
        "validation": validation,
        "parity": {
            "text": sample.record["source"],
            "reference": "torch" if quantization is None else "torch int8 twin",
            **shipped.checks,
            "graphs": graph_checks,
            SEQUENCE_LOGPROBS: scoring_checks,
        },
        "runtime": shipped.runtime,
        "graphs": manifest_entries(graphs),
    }
    if quantization is not None:
        manifest["parity_fp32"] = fp32.checks
        manifest["quantization"] = quantization
    tokenizer_json = json.dumps(tokenizer.to_dict(), indent=2) + "\n"
    files: dict[str, Path | bytes] = {MODEL: shipped.path, TOKENIZER: tokenizer_json.encode()}
    files.update({graph.file: graph.model for graph in graphs.values()})
    write_bundle(out, files, manifest)
    written: dict[str, Any] = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    return written
