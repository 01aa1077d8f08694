"""The scoring graph: the log-probability of every word after every position, proven here.

`build_bundle` ships it as `sequence_logprobs.onnx` (see `simmer.bundle`): model.onnx's
inputs tokens (B, T), h0 and c0 (L, B, H); outputs `logprobs` (B, T, V), the
log-softmax over the vocabulary after each position, and hn, cn. Echo scoring (issues
#16 and #18) reads it through `service.engine.scoring`: the logprob of each token of a
text given the ones before it. model.onnx stays as it is, last position only, so the
decode path never computes (B, T, V).

Unlike the sampling graphs (`export.graphs`, appended to the model with onnx.helper) it
is exported from torch like model.onnx, from `SequenceLogprobs`: the model graph ends
in a Gemm over the last position, and the output layer at every position is a
different graph, not more nodes on that one. The output layer runs over the (B * T, H)
hidden states as one Gemm, the form `export.quantize.write_int8_graph` rewrites, so an
int8 bundle's scoring graph is rewritten exactly as its model.onnx is (one int8 scale
per position, as the model has one per row) and scores what that model serves.

`check_scoring` is its parity check, like `export.parity` for the model, on random
tokens and states and on real text from a zero state:

- torch: logprobs and state agree with the reference's log_softmax within PARITY_TOL
  (for int8, the twin's output layer applied to onnxruntime's own hidden states, for
  the reason `export.parity` gives);
- stepping: the shipped model.onnx fed one token at a time, carrying (hn, cn), gives
  log_softmax(logits) at every position and the final state within STEP_TOL;
- chunks: the scoring graph over a sequence cut in two, the state carried, is one pass.

A failure is an ExportError with one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from export.graphs import BuiltGraph, checked
from export.onnx_export import ExportError, export_step
from export.parity import (
    PARITY_TOL,
    STEP_TOL,
    Reference,
    random_state,
    run_graph,
    text_batch,
    zero_state,
)
from export.quantize import Int8Weights, write_int8_graph
from export.runtime import open_session
from simmer.bundle import SEQUENCE_LOGPROBS, BundleError, check_io, graph_contract, graph_io
from training.model import RecipeLSTM

SCORING_AXES = {"logprobs": {0: "batch", 1: "seq"}, "hn": {1: "batch"}, "cn": {1: "batch"}}
# (kind, batch, seq): random tokens from a random state, or real text from zero
SCORING_CASES = (("random", 1, 1), ("random", 3, 7), ("text", 1, 48), ("text", 4, 24))
SEED = 0

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


class SequenceLogprobs(nn.Module):
    """The scoring graph: explicit (h, C) in and out, log-softmax at every position."""

    def __init__(self, model: RecipeLSTM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.model.embedding(tokens)  # (B, T, E)
        out, (hn, cn) = self.model.lstm(x, (h0, c0))  # (B, T, H); hn, cn: (L, B, H)
        logits = self.model.head(out.reshape(-1, out.shape[-1]))  # (B * T, V): one Gemm
        logprobs = torch.log_softmax(logits, dim=-1)
        vocab = self.model.config.vocab_size
        return logprobs.reshape(tokens.shape[0], tokens.shape[1], vocab), hn, cn  # (B, T, V)


def build_scoring(
    model: RecipeLSTM, work: Path, opset: int, int8: Int8Weights | None = None
) -> BuiltGraph:
    """sequence_logprobs for `model` at `opset` (int8 with `int8`, the weights the
    bundle's model.onnx was quantised with), passed by onnx.checker."""
    raw = work / f"{SEQUENCE_LOGPROBS}.fp32.onnx"
    export_step(SequenceLogprobs(model), model.config, raw, opset, SCORING_AXES)
    path = raw
    if int8 is not None:
        path = work / f"{SEQUENCE_LOGPROBS}.int8.onnx"
        write_int8_graph(raw, int8, path)
    return checked(SEQUENCE_LOGPROBS, onnx.load(str(path)), {})


# --- the parity check ----------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis, in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    out: np.ndarray = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return out


def stepped(
    model: ort.InferenceSession, tokens: np.ndarray, h: np.ndarray, c: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """model.onnx fed one token at a time, the state carried: logits (B, T, V), the last
    layer's hidden state after each position (B, T, H), and the final hn, cn."""
    logits, hidden = [], []
    for t in range(tokens.shape[1]):
        step_logits, h, c = run_graph(model, tokens[:, t : t + 1], h, c)
        logits.append(step_logits)
        hidden.append(h[-1])
    return np.stack(logits, axis=1), np.stack(hidden, axis=1), h, c


def _score(
    session: ort.InferenceSession, tokens: np.ndarray, h: np.ndarray, c: np.ndarray
) -> Arrays:
    logprobs, hn, cn = session.run(None, {"tokens": tokens, "h0": h, "c0": c})
    return logprobs, hn, cn


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max()) if a.shape == b.shape else np.inf


@torch.no_grad()
def _reference_logprobs(
    reference: Reference, tokens: np.ndarray, h: np.ndarray, c: np.ndarray, hidden: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference's log_softmax at every position (for int8, of its output layer
    over onnxruntime's hidden states `hidden`) and its final state."""
    logits, (hn, cn) = reference.model(
        torch.from_numpy(tokens), (torch.from_numpy(h), torch.from_numpy(c))
    )
    if reference.head is not None:
        logits = reference.head(torch.from_numpy(hidden))
    return log_softmax(logits.numpy()), hn.numpy(), cn.numpy()


def _cases(
    reference: Reference, texts: Sequence[Sequence[int]]
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    config = reference.config
    rng = np.random.default_rng(SEED)
    cases = []
    for kind, batch, seq in SCORING_CASES:
        if kind == "random":
            tokens = rng.integers(0, config.vocab_size, (batch, seq), dtype=np.int64)
            cases.append((kind, tokens, *random_state(config, batch, rng)))
        else:
            cases.append((kind, text_batch(texts, batch, seq), *zero_state(config, batch)))
    return cases


def _fail(kind: str, tokens: np.ndarray, what: str, error: float, tol: float) -> ExportError:
    return ExportError(
        f"{SEQUENCE_LOGPROBS} parity failed on {kind} input {list(tokens.shape)}: {what} "
        f"by {error:.2e} (tolerance {tol:g})"
    )


def check_scoring(
    graph: BuiltGraph, reference: Reference, model_path: Path, texts: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """The scoring graph's inputs and outputs as `simmer.bundle` expects them, then its
    parity with torch, with stepping model.onnx and across chunks (see the module
    docstring); the figures for the manifest. The first failure raises ExportError."""
    config = reference.config
    inputs, outputs = graph_contract(
        SEQUENCE_LOGPROBS, graph.params, config.vocab_size, config.hidden_size, config.num_layers
    )
    try:
        check_io(graph.file, graph_io(graph.model), inputs, outputs)
    except BundleError as exc:
        raise ExportError(str(exc)) from exc
    scoring, model = open_session(graph.model), open_session(model_path)
    worst = dict.fromkeys(("torch_logprobs", "torch_state", "steps_logprobs", "steps_state"), 0.0)
    worst["chunked"] = 0.0
    for kind, tokens, h, c in _cases(reference, texts):
        logprobs, hn, cn = _score(scoring, tokens, h, c)
        step_logits, hidden, step_h, step_c = stepped(model, tokens, h, c)
        ref_logprobs, ref_h, ref_c = _reference_logprobs(reference, tokens, h, c, hidden)
        errors = {
            "torch_logprobs": _max_abs(logprobs, ref_logprobs),
            "torch_state": max(_max_abs(hn, ref_h), _max_abs(cn, ref_c)),
            "steps_logprobs": _max_abs(logprobs, log_softmax(step_logits)),
            "steps_state": max(_max_abs(hn, step_h), _max_abs(cn, step_c)),
        }
        cut = tokens.shape[1] // 2
        if cut:
            first, h1, c1 = _score(scoring, tokens[:, :cut], h, c)
            second, h2, c2 = _score(scoring, tokens[:, cut:], h1, c1)
            joined = np.concatenate([first, second], axis=1)
            errors["chunked"] = max(_max_abs(joined, logprobs), _max_abs(h2, hn), _max_abs(c2, cn))
        for what, error in errors.items():
            tol = PARITY_TOL if what.startswith("torch") else STEP_TOL
            if not error <= tol:
                raise _fail(kind, tokens, _DIFFERS[what], error, tol)
            worst[what] = max(worst[what], error)
    return {
        "torch_tolerance": PARITY_TOL,
        "steps_tolerance": STEP_TOL,
        "cases": [f"{kind} {b}x{s}" for kind, b, s in SCORING_CASES],
        **{f"max_abs_{what}": error for what, error in worst.items()},
    }


_DIFFERS = {
    "torch_logprobs": "logprobs differ from torch's log_softmax",
    "torch_state": "the state differs from torch's",
    "steps_logprobs": "logprobs differ from model.onnx stepped one token at a time",
    "steps_state": "the state differs from model.onnx stepped one token at a time",
    "chunked": "two chunks with the state carried differ from one pass",
}
