"""The sampling graphs the service runs besides the model, built with `onnx.helper` and
proven here (the scoring graph, exported from torch, is `export.scoring`'s).

`build_bundle` ships them in every bundle (what each computes is in
`simmer.bundle`'s docstring); they depend only on the vocabulary size and, for the
fused one, on the model graph, so the export builds and checks them once and the
service only loads them:

- `sampling_direct`: softmax(logits * inv_t) for every word and the block sums, the
  heavy part of sampling a row directly (the lookup is numpy in the service);
- `sampling_envelope`: block maxima, the bound on each block's mass, and exact weights
  for the `exact_blocks` blocks with the largest maxima: steps 1 and 2 of the
  service's rejection sampler (see `service.sampling`);
- `step_softmax`: the model's step graph with `sampling_direct`'s nodes appended to its
  logits, so that a small decode batch gets logits, state and weights in one call;
- `prefill`: the model's step graph without its output layer (the nodes that only the
  logits need are dropped), so that feeding a prompt, whose logits nobody reads, costs
  the LSTM alone: at batch 1 the output layer is most of a step;
- `decode_run` (from opset 16): `RUN_STEPS` decode steps in one call, each sampled in
  the graph and fed to the next, so that a small batch pays for one onnxruntime call,
  one Python pass and one hand-off to the event loop per `RUN_STEPS` tokens instead of
  per token. It samples softmax(logits * inv_t), less one banned word per row, by a
  two-level lookup like the service's, in float64 (`_pick_nodes`).

The vocabulary is cut into blocks of `width` = ceil(sqrt(V)) consecutive words; the
last block is padded with -inf logits, whose weight is 0. Scaling by inv_t comes
before the padding, so inv_t = 0 never meets -inf.

Every graph is written at the model's opset (one opset per bundle): the few ops whose
form changed (ReduceSum and Unsqueeze take axes as an input from opset 13, ReduceMax
from 18) are written in the form that opset wants; below opset 13 Softmax's `axis`
meant something else for inputs of more than two dimensions, so opset 13 is the
least this module builds for. The model's own nodes and initializers are kept as
they are; the added nodes, values and initializers get names under `sampling/` that
the model does not use, and the public names (`inv_t`, `weights`, `sums`) must be free.

`check_graphs` is their parity check, like `export.parity` for the model: each graph
passes `onnx.checker` (full check), has the inputs and outputs `simmer.bundle` expects,
matches a numpy reference on random logits in onnxruntime (batch 1 and 40),
step_softmax gives exactly model.onnx's logits, hn and cn, prefill exactly its hn and
cn, and decode_run's states are exactly model.onnx's stepped with the tokens it drew,
each token drawn where the float64 distribution puts its number. A failure is an
ExportError with one line.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.onnx_export import ExportError
from export.parity import random_state
from export.runtime import open_session
from simmer.bundle import (
    DECODE_RUN,
    PREFILL,
    SAMPLING_DIRECT,
    SAMPLING_ENVELOPE,
    STEP_SOFTMAX,
    BundleError,
    GraphIO,
    block_count,
    block_width,
    check_io,
    graph_contract,
    graph_io,
)
from training.model import LSTMConfig

EXACT_BLOCKS = 8  # blocks per row whose words get exact weights in the envelope
MIN_OPSET = 13
PREFIX = "sampling/"  # names of what step_softmax adds to the model's graph
RUN_PREFIX = "run/"  # names of what decode_run adds, and of its copies of the model
RUN_PUBLIC = ("tokens", "h0", "c0", "inv_t", "ban", "uniforms", "sampled", "hs", "cs")
RUN_MIN_OPSET = 16  # ScatterElements with reduction="add"
RUN_STEPS = 8  # decode steps per decode_run call
PUBLIC = ("inv_t", "weights", "sums")  # step_softmax's added input and outputs
GRAPH_TOL = 1e-5  # |onnxruntime - numpy| / max(1, |numpy|)
CHECK_BATCHES = (1, 40)
STEP_CASES = ((1, 1), (40, 1), (4, 9))  # (batch, seq)
SEED = 0


@dataclass(frozen=True)
class BuiltGraph:
    """One checked-by-onnx graph, serialized, with the parameters it was built with."""

    name: str
    model: bytes  # a serialized ModelProto
    params: dict[str, int]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


def block_params(vocab: int) -> dict[str, int]:
    """width, blocks and exact_blocks for a vocabulary of `vocab` words."""
    width = block_width(vocab)
    blocks = block_count(vocab, width)
    return {"width": width, "blocks": blocks, "exact_blocks": min(EXACT_BLOCKS, blocks)}


# --- building ------------------------------------------------------------------------------


class _Nodes:
    """Nodes and initializers for one graph at one opset, under names nobody uses yet."""

    def __init__(self, opset: int, taken: Iterable[str] = (), prefix: str = "") -> None:
        self.opset = opset
        self.prefix = prefix
        self.taken = set(taken)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._constants: dict[str, str] = {}

    def name(self, base: str) -> str:
        """`prefix` + `base`, with a number added if the graph has that name already."""
        candidate, n = self.prefix + base, 1
        while candidate in self.taken:
            candidate, n = f"{self.prefix}{base}_{n}", n + 1
        self.taken.add(candidate)
        return candidate

    def const(self, base: str, value: np.ndarray) -> str:
        """An initializer holding `value`, once per `base`."""
        if base not in self._constants:
            name = self.name(base)
            self.initializers.append(numpy_helper.from_array(value, name))
            self._constants[base] = name
        return self._constants[base]

    def ints(self, base: str, values: list[int]) -> str:
        return self.const(base, np.array(values, np.int64))

    def add(self, op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, self.name(op), **attrs))

    def reduce(self, op: str, x: str, out: str, axis: int, keepdims: int) -> None:
        """ReduceMax or ReduceSum over one axis, in the form this opset wants."""
        if self.opset >= (13 if op == "ReduceSum" else 18):
            self.add(op, [x, self.ints(f"axis{axis}", [axis])], [out], keepdims=keepdims)
        else:
            self.add(op, [x], [out], axes=[axis], keepdims=keepdims)

    def unsqueeze(self, x: str, out: str, axis: int) -> None:
        self.add("Unsqueeze", [x, self.ints(f"axis{axis}", [axis])], [out])  # opset >= 13


def _padded(b: _Nodes, x: str, vocab: int, width: int) -> str:
    """(B, V) -> (B, nb * width): the last block padded with -inf."""
    pad = block_count(vocab, width) * width - vocab
    if not pad:
        return x
    padded = b.name("padded")
    neg_inf = b.const("neg_inf", np.array(-np.inf, np.float32))
    b.add("Pad", [x, b.ints("pads", [0, 0, 0, pad]), neg_inf], [padded])
    return padded


def _blocked(b: _Nodes, x: str, vocab: int, width: int) -> str:
    """(B, nb * width) -> (B, nb, width)."""
    blocked = b.name("blocked")
    b.add("Reshape", [x, b.ints("block_shape", [0, block_count(vocab, width), width])], [blocked])
    return blocked


def _direct_nodes(
    b: _Nodes, vocab: int, width: int, logits: str, inv_t: str, weights: str, sums: str
) -> None:
    """logits (B, V), inv_t (B, 1) -> weights (B, nb * width) = softmax(logits * inv_t),
    0 past the vocabulary, and their block sums (B, nb)."""
    scaled = b.name("scaled")
    b.add("Mul", [logits, inv_t], [scaled])  # before the padding: 0 * -inf is nan
    _softmax_nodes(b, vocab, width, scaled, weights, sums)


def _softmax_nodes(b: _Nodes, vocab: int, width: int, scaled: str, weights: str, sums: str) -> None:
    """scaled logits (B, V) -> weights (B, nb * width) = their softmax, 0 past the
    vocabulary, and the block sums (B, nb)."""
    b.add("Softmax", [_padded(b, scaled, vocab, width)], [weights], axis=1)  # (B, nb * width)
    b.reduce("ReduceSum", _blocked(b, weights, vocab, width), sums, axis=2, keepdims=0)


def _tensor(name: str, elem_type: int, dims: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, dims)


def _model(b: _Nodes, name: str, inputs: list[Any], outputs: list[Any]) -> onnx.ModelProto:
    graph = helper.make_graph(b.nodes, name, inputs, outputs, b.initializers)
    opsets = [helper.make_opsetid("", b.opset)]
    return helper.make_model(
        graph,
        opset_imports=opsets,
        ir_version=helper.find_min_ir_version_for(opsets),
        producer_name="simmer-export",
    )


def _check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ExportError(
            f"the sampling graphs need opset {MIN_OPSET} or later; the model is at opset {opset}"
        )


def direct_graph(vocab: int, width: int, opset: int) -> onnx.ModelProto:
    """logits float32 (B, V), inv_t float32 (B, 1) -> weights, sums (see `_direct_nodes`)."""
    _check_opset(opset)
    blocks = block_count(vocab, width)
    b = _Nodes(opset, taken=("logits", "inv_t", "weights", "sums"))
    _direct_nodes(b, vocab, width, "logits", "inv_t", "weights", "sums")
    return _model(
        b,
        "simmer_sampling_direct",
        [
            _tensor("logits", TensorProto.FLOAT, ["batch", vocab]),
            _tensor("inv_t", TensorProto.FLOAT, ["batch", 1]),
        ],
        [
            _tensor("weights", TensorProto.FLOAT, ["batch", blocks * width]),
            _tensor("sums", TensorProto.FLOAT, ["batch", blocks]),
        ],
    )


def envelope_graph(vocab: int, width: int, exact_blocks: int, opset: int) -> onnx.ModelProto:
    """logits float32 (B, V), inv_t float32 (B, 1) -> block_max (B, nb), bound (B, nb) =
    exp((block_max - max) * inv_t), exact int64 (B, k) (the k = `exact_blocks` blocks with
    the largest maxima, largest first), weights (B, k, width) = exp((logit - max) * inv_t)
    of their words (0 past the vocabulary) and mass (B, k), their sums."""
    _check_opset(opset)
    blocks = block_count(vocab, width)
    outputs = ("block_max", "bound", "exact", "weights", "mass")
    b = _Nodes(opset, taken=("logits", "inv_t", *outputs))
    blocked = _blocked(b, _padded(b, "logits", vocab, width), vocab, width)  # (B, nb, width)
    top, top3, inv_t3 = b.name("top"), b.name("top3"), b.name("inv_t3")
    b.reduce("ReduceMax", blocked, "block_max", axis=2, keepdims=0)  # (B, nb)
    b.reduce("ReduceMax", "block_max", top, axis=1, keepdims=1)  # (B, 1)
    gap, log = b.name("block_gap"), b.name("block_log")
    b.add("Sub", ["block_max", top], [gap])
    b.add("Mul", [gap, "inv_t"], [log])
    b.add("Exp", [log], ["bound"])
    exact_max, index = b.name("exact_max"), b.name("exact_index")
    exact_logits = b.name("exact_logits")
    b.add("TopK", ["block_max", b.ints("k", [exact_blocks])], [exact_max, "exact"], axis=1)
    b.unsqueeze("exact", index, axis=2)  # (B, k, 1)
    b.add("GatherND", [blocked, index], [exact_logits], batch_dims=1)  # (B, k, width)
    b.unsqueeze(top, top3, axis=2)
    b.unsqueeze("inv_t", inv_t3, axis=2)
    word_gap, word_log = b.name("word_gap"), b.name("word_log")
    b.add("Sub", [exact_logits, top3], [word_gap])
    b.add("Mul", [word_gap, inv_t3], [word_log])
    b.add("Exp", [word_log], ["weights"])  # (B, k, width)
    b.reduce("ReduceSum", "weights", "mass", axis=2, keepdims=0)  # (B, k)
    return _model(
        b,
        "simmer_sampling_envelope",
        [
            _tensor("logits", TensorProto.FLOAT, ["batch", vocab]),
            _tensor("inv_t", TensorProto.FLOAT, ["batch", 1]),
        ],
        [
            _tensor("block_max", TensorProto.FLOAT, ["batch", blocks]),
            _tensor("bound", TensorProto.FLOAT, ["batch", blocks]),
            _tensor("exact", TensorProto.INT64, ["batch", exact_blocks]),
            _tensor("weights", TensorProto.FLOAT, ["batch", exact_blocks, width]),
            _tensor("mass", TensorProto.FLOAT, ["batch", exact_blocks]),
        ],
    )


def model_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the default ONNX domain."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError("the model graph imports no opset of the default ONNX domain")


def _names(graph: onnx.GraphProto) -> set[str]:
    """Every value, initializer and node name `graph` uses."""
    names = {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
    names |= {init.name for init in graph.initializer}
    for node in graph.node:
        names |= {node.name, *node.input, *node.output}
    return names - {""}


def step_softmax_graph(model: onnx.ModelProto, vocab: int, width: int) -> onnx.ModelProto:
    """A copy of the model's step graph with `_direct_nodes` on its logits: an extra input
    inv_t (B, 1) and extra outputs weights (B, nb * width) and sums (B, nb)."""
    opset = model_opset(model)
    _check_opset(opset)
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    graph = fused.graph
    used = _names(graph)
    clash = [name for name in PUBLIC if name in used]
    if clash:
        raise ExportError(f"the model graph already uses {clash}; step_softmax adds them")
    logits = next((v for v in graph.output if v.name == "logits"), None)
    if logits is None:
        raise ExportError("the model graph has no 'logits' output")
    dims = logits.type.tensor_type.shape.dim
    batch = (dims[0].dim_param if len(dims) else "") or "batch"
    blocks = block_count(vocab, width)
    b = _Nodes(opset, taken=used | set(PUBLIC), prefix=PREFIX)
    _direct_nodes(b, vocab, width, "logits", "inv_t", "weights", "sums")
    graph.node.extend(b.nodes)
    graph.initializer.extend(b.initializers)
    graph.input.append(_tensor("inv_t", TensorProto.FLOAT, [batch, 1]))
    graph.output.extend(
        [
            _tensor("weights", TensorProto.FLOAT, [batch, blocks * width]),
            _tensor("sums", TensorProto.FLOAT, [batch, blocks]),
        ]
    )
    return fused


def prefill_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model's step graph with hn and cn its only outputs, and only the
    nodes, inputs, initializers and value infos those need; an LSTM's outputs that
    nothing kept reads (the whole sequence Y) are left out, as LSTM allows."""
    state = onnx.ModelProto()
    state.CopyFrom(model)
    graph = state.graph
    outputs = [value for value in graph.output if value.name in ("hn", "cn")]
    if len(outputs) != 2:
        raise ExportError("the model graph has no 'hn' and 'cn' outputs")
    needed = {"hn", "cn"}
    kept = []
    for node in reversed(graph.node):  # a node comes after the nodes whose outputs it reads
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    if len(kept) == len(graph.node):
        raise ExportError("every node of the model graph computes the state: nothing to drop")
    for node in kept:
        if node.op_type == "LSTM":  # Y, Y_h and Y_c are each optional
            node.output[:] = [name if name in needed else "" for name in node.output]
    inputs = [value for value in graph.input if value.name in needed]
    initializers = [init for init in graph.initializer if init.name in needed]
    sparse = [init for init in graph.sparse_initializer if init.values.name in needed]
    infos = [info for info in graph.value_info if info.name in needed]
    del graph.node[:], graph.input[:], graph.output[:], graph.initializer[:]
    del graph.sparse_initializer[:], graph.value_info[:]
    graph.node.extend(reversed(kept))
    graph.input.extend(inputs)
    graph.output.extend(outputs)
    graph.initializer.extend(initializers)
    graph.sparse_initializer.extend(sparse)
    graph.value_info.extend(infos)
    return state


# --- decode_run: several decode steps, sampled, in one call ----------------------------------

INT_MAX = np.iinfo(np.int64).max


def _pick_nodes(
    b: _Nodes, vocab: int, width: int, weights: str, sums: str, u: str, index: str
) -> None:
    """weights (B, nb * width), sums (B, nb) float32 and u (B, 1) float64 in [0, 1) ->
    index (B, 1) int64, a sample of the weights: the first block whose running block sum
    passes u * total, then, inside it, the first word whose running weight passes the
    same share of the block's own running total. Running sums are float64. Each share is
    clipped to [0, 1 - 2**-52], so a word is always found and its weight is positive."""
    double = TensorProto.DOUBLE
    axis1, axis1_0d = b.ints("axis1", [1]), b.const("axis1_0d", np.array(1, np.int64))
    below_one = b.const("below_one", np.array(1.0 - 2.0**-52, np.float64))
    zero = b.const("zero_d", np.array(0.0, np.float64))
    end, last = b.ints("end", [INT_MAX]), b.ints("last", [-1])

    def first_above(running: str, target: str, base: str) -> str:
        """(B, 1): the first index where running (B, n) passes target (B, 1)."""
        above, flags, out = (b.name(f"{base}_{n}") for n in ("above", "flags", "first"))
        b.add("Greater", [running, target], [above])
        b.add("Cast", [above], [flags], to=TensorProto.INT32)
        b.add("ArgMax", [flags], [out], axis=1, keepdims=1)  # the first of the largest
        return out

    def share_of(total: str, fraction: str, base: str) -> str:
        clipped, out = b.name(f"{base}_share"), b.name(f"{base}_target")
        b.add("Clip", [fraction, zero, below_one], [clipped])  # rounding: into [0, 1)
        b.add("Mul", [clipped, total], [out])
        return out

    sums_d, cdf, total = b.name("sums_d"), b.name("cdf"), b.name("total")
    b.add("Cast", [sums], [sums_d], to=double)
    b.add("CumSum", [sums_d, axis1_0d], [cdf])
    b.add("Slice", [cdf, last, end, axis1], [total])
    target = share_of(total, u, "row")
    block = first_above(cdf, target, "block")
    upto, mass, before, rest, fraction = (
        b.name(n) for n in ("upto", "mass", "before", "rest", "fraction")
    )
    b.add("GatherElements", [cdf, block], [upto], axis=1)
    b.add("GatherElements", [sums_d, block], [mass], axis=1)
    b.add("Sub", [upto, mass], [before])
    b.add("Sub", [target, before], [rest])
    b.add("Div", [rest, mass], [fraction])  # mass > 0: the block's running sum passed
    inner, inner_d, running, inner_total = (
        b.name(n) for n in ("inner", "inner_d", "running", "inner_total")
    )
    b.add("GatherND", [_blocked(b, weights, vocab, width), block], [inner], batch_dims=1)
    b.add("Cast", [inner], [inner_d], to=double)
    b.add("CumSum", [inner_d, axis1_0d], [running])
    b.add("Slice", [running, last, end, axis1], [inner_total])
    offset = first_above(running, share_of(inner_total, fraction, "word"), "word")
    start = b.name("start")
    b.add("Mul", [block, b.ints("width", [width])], [start])
    b.add("Add", [start, offset], [index])


def decode_run_graph(model: onnx.ModelProto, vocab: int, width: int, steps: int) -> onnx.ModelProto:
    """`steps` decode steps, sampled, in one graph: the model's step graph copied `steps`
    times, each copy fed the token the copy before it sampled, and its state.

    Inputs: the model's tokens (B, T), h0 and c0; inv_t float32 (B, 1); ban int64 (B, 1),
    a word the row never draws, or -1 for none; uniforms float64 (B, steps), one number
    in [0, 1) per row and step. Outputs: sampled int64 (B, steps), and hs, cs float32
    (steps, L, B, H), the state after each step. Step k draws from softmax(logits * inv_t)
    without the banned word, with uniforms[:, k] (`_pick_nodes`). The model's own nodes
    keep their names under `run/<k>/`; what the function adds is under `run/`.
    """
    opset = model_opset(model)
    if opset < RUN_MIN_OPSET:
        raise ExportError(
            f"decode_run needs opset {RUN_MIN_OPSET} or later; the model is at {opset}"
        )
    if steps < 2:
        raise ExportError(f"decode_run needs at least 2 steps, got {steps}")
    graph = model.graph
    shared = {init.name for init in graph.initializer}
    b = _Nodes(opset, taken=_names(graph) | set(RUN_PUBLIC), prefix=RUN_PREFIX)
    # the ban, as a term added to one scaled logit per row: -inf, or 0 at word 0
    banned, ban_at, ban_add = b.name("banned"), b.name("ban_at"), b.name("ban_add")
    b.add("Less", ["ban", b.ints("zero_i", [0])], [banned])
    b.add("Where", [banned, b.ints("zero_i", [0]), "ban"], [ban_at])
    zero_f, neg_inf = (
        b.const("zero_f", np.array(0.0, np.float32)),
        b.const("neg_inf", np.array(-np.inf, np.float32)),
    )
    b.add("Where", [banned, zero_f, neg_inf], [ban_add])
    feed = {"tokens": "tokens", "h0": "h0", "c0": "c0"}
    sampled: list[str] = []
    hs: list[str] = []
    cs: list[str] = []
    axis1 = b.ints("axis1", [1])
    for k in range(steps):
        rename = dict(feed)  # the model's value names -> this copy's
        for node in graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            for i, name in enumerate(copy.input):
                if name and name not in shared:
                    copy.input[i] = rename.setdefault(name, f"{RUN_PREFIX}{k}/{name}")
            for i, name in enumerate(copy.output):
                copy.output[i] = rename.setdefault(name, f"{RUN_PREFIX}{k}/{name}")
            copy.name = b.name(f"{k}/{node.name or node.op_type}")
            b.nodes.append(copy)
        b.taken |= set(rename.values())
        scaled, kept, weights, sums, u, token = (
            b.name(f"{n}{k}") for n in ("scaled", "kept", "weights", "sums", "u", "token")
        )
        b.add("Mul", [rename["logits"], "inv_t"], [scaled])
        b.add("ScatterElements", [scaled, ban_at, ban_add], [kept], axis=1, reduction="add")
        _softmax_nodes(b, vocab, width, kept, weights, sums)
        at, after = b.ints(f"at{k}", [k]), b.ints(f"at{k + 1}", [k + 1])
        b.add("Slice", ["uniforms", at, after, axis1], [u])
        _pick_nodes(b, vocab, width, weights, sums, u, token)
        for name, out in (("hn", hs), ("cn", cs)):
            lifted = b.name(f"{name}{k}")
            b.unsqueeze(rename[name], lifted, axis=0)
            out.append(lifted)
        sampled.append(token)
        feed = {"tokens": token, "h0": rename["hn"], "c0": rename["cn"]}
    b.add("Concat", sampled, ["sampled"], axis=1)
    b.add("Concat", hs, ["hs"], axis=0)
    b.add("Concat", cs, ["cs"], axis=0)
    state = graph.input[1].type.tensor_type.shape.dim  # h0 (L, B, H)
    layers, hidden = state[0].dim_value, state[2].dim_value
    if not (layers and hidden):
        raise ExportError("decode_run needs the model's layers and hidden size as fixed sizes")
    inputs = [
        *graph.input,
        _tensor("inv_t", TensorProto.FLOAT, ["batch", 1]),
        _tensor("ban", TensorProto.INT64, ["batch", 1]),
        _tensor("uniforms", TensorProto.DOUBLE, ["batch", steps]),
    ]
    outputs = [
        _tensor("sampled", TensorProto.INT64, ["batch", steps]),
        _tensor("hs", TensorProto.FLOAT, [steps, layers, "batch", hidden]),
        _tensor("cs", TensorProto.FLOAT, [steps, layers, "batch", hidden]),
    ]
    initializers = [*graph.initializer, *b.initializers]
    run = onnx.ModelProto()
    run.CopyFrom(model)  # its opsets, functions and IR version, for its own nodes
    run.graph.CopyFrom(
        helper.make_graph(b.nodes, "simmer_decode_run", inputs, outputs, initializers)
    )
    run.producer_name = "simmer-export"
    return run


def checked(name: str, model: onnx.ModelProto, params: dict[str, int]) -> BuiltGraph:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"onnx.checker failed for {name}: {str(exc).splitlines()[0]}") from exc
    return BuiltGraph(name, model.SerializeToString(), params)


def build_graphs(model_path: Path, vocab: int) -> dict[str, BuiltGraph]:
    """step_softmax and prefill (from the model graph at `model_path`), sampling_direct,
    sampling_envelope and, from opset 16, decode_run, each passed by onnx.checker, at
    the model's opset."""
    model = onnx.load(str(model_path))
    opset = model_opset(model)
    params = block_params(vocab)
    width, k = params["width"], params["exact_blocks"]
    blocks = {"width": width, "blocks": params["blocks"]}
    graphs = {
        STEP_SOFTMAX: checked(STEP_SOFTMAX, step_softmax_graph(model, vocab, width), blocks),
        SAMPLING_DIRECT: checked(SAMPLING_DIRECT, direct_graph(vocab, width, opset), blocks),
        SAMPLING_ENVELOPE: checked(
            SAMPLING_ENVELOPE, envelope_graph(vocab, width, k, opset), params
        ),
    }
    try:
        graphs[PREFILL] = checked(PREFILL, prefill_graph(model), {})
    except ExportError as exc:  # optional: the service then prefills with the whole model
        print(f"export: prefill skipped: {exc}", file=sys.stderr)
    if opset >= RUN_MIN_OPSET:  # older models serve without it
        try:
            run = decode_run_graph(model, vocab, width, RUN_STEPS)
            graphs[DECODE_RUN] = checked(DECODE_RUN, run, {**blocks, "steps": RUN_STEPS})
        except ExportError as exc:  # optional: the service then takes a step per call
            print(f"export: decode_run skipped: {exc}", file=sys.stderr)
    return graphs


def manifest_entries(graphs: Mapping[str, BuiltGraph]) -> dict[str, dict[str, Any]]:
    """The manifest's `graphs` section (write_bundle adds each file's sha256)."""
    entries = {}
    for name, graph in graphs.items():
        io = _io(graph)
        entries[name] = {
            "file": graph.file,
            "inputs": {tensor: list(shape) for tensor, (_, shape) in io.inputs.items()},
            "outputs": {tensor: list(shape) for tensor, (_, shape) in io.outputs.items()},
            "params": dict(graph.params),
        }
    return entries


def _io(graph: BuiltGraph) -> GraphIO:
    try:
        return graph_io(graph.model)
    except BundleError as exc:
        raise ExportError(f"{graph.name}: {exc}") from exc


# --- the parity check ----------------------------------------------------------------------


def direct_reference(
    logits: np.ndarray, inv_t: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """What sampling_direct computes, in float64: weights (B, nb * width), sums (B, nb)."""
    rows, vocab = logits.shape
    blocks = block_count(vocab, width)
    scaled = logits.astype(np.float64) * inv_t.reshape(rows, 1)
    scaled -= scaled.max(axis=1, keepdims=True)
    weights = np.zeros((rows, blocks * width))
    weights[:, :vocab] = np.exp(scaled)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights, weights.reshape(rows, blocks, width).sum(axis=2)


def envelope_reference(
    logits: np.ndarray, inv_t: np.ndarray, width: int, exact: np.ndarray
) -> dict[str, np.ndarray]:
    """What sampling_envelope computes, in float64, given the blocks it chose as `exact`
    (ties between block maxima may be broken either way): block_max, bound, the largest
    block maxima in order (`exact_max`), weights and mass."""
    rows, vocab = logits.shape
    blocks = block_count(vocab, width)
    padded = np.full((rows, blocks * width), -np.inf)
    padded[:, :vocab] = logits
    blocked = padded.reshape(rows, blocks, width)
    block_max = blocked.max(axis=2)
    top = block_max.max(axis=1, keepdims=True)
    t = inv_t.reshape(rows, 1).astype(np.float64)
    weights = np.exp((blocked[np.arange(rows)[:, None], exact] - top[:, :, None]) * t[:, :, None])
    return {
        "block_max": block_max,
        "bound": np.exp((block_max - top) * t),
        "exact_max": -np.sort(-block_max, axis=1)[:, : exact.shape[1]],
        "weights": weights,
        "mass": weights.sum(axis=2),
    }


def _error(got: np.ndarray, want: np.ndarray) -> float:
    """The largest |got - want| / max(1, |want|); 0 for empty arrays."""
    if got.shape != want.shape:
        return np.inf
    if not got.size:
        return 0.0
    return float((np.abs(got.astype(np.float64) - want) / np.maximum(1.0, np.abs(want))).max())


def _logits_cases(vocab: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random logits and 1/T for each batch size; the last row of a batch of several has
    equal logits (ties everywhere), and 1/T spans 0.1 to 1e4 (T down to MIN_TEMPERATURE)."""
    rng = np.random.default_rng(SEED)
    cases = []
    for rows in CHECK_BATCHES:
        logits = (rng.standard_normal((rows, vocab)) * 4).astype(np.float32)
        inv_t = np.exp(rng.uniform(np.log(0.1), np.log(10.0), (rows, 1))).astype(np.float32)
        inv_t[0] = 1.0
        if rows > 2:
            logits[-1] = 0.5
            inv_t[-2] = 1e4
        cases.append((logits, inv_t))
    return cases


def _fail(name: str, what: str, error: float, shape: tuple[int, ...]) -> ExportError:
    return ExportError(
        f"{name} parity failed on logits {list(shape)}: {what} differs from numpy by "
        f"{error:.2e} (tolerance {GRAPH_TOL:g})"
    )


def check_direct(graph: BuiltGraph, vocab: int) -> float:
    """sampling_direct vs `direct_reference`; the worst error."""
    session = open_session(graph.model)
    worst = 0.0
    for logits, inv_t in _logits_cases(vocab):
        weights, sums = session.run(None, {"logits": logits, "inv_t": inv_t})
        want_w, want_s = direct_reference(logits, inv_t, graph.params["width"])
        for what, got, want in (("weights", weights, want_w), ("sums", sums, want_s)):
            error = _error(got, want)
            if not error <= GRAPH_TOL:
                raise _fail(graph.name, what, error, logits.shape)
            worst = max(worst, error)
    return worst


def check_envelope(graph: BuiltGraph, vocab: int) -> float:
    """sampling_envelope vs `envelope_reference`; the worst error. Its exact blocks must be
    distinct blocks whose maxima are the largest, in order."""
    session = open_session(graph.model)
    names = ["block_max", "bound", "exact", "weights", "mass"]
    worst = 0.0
    for logits, inv_t in _logits_cases(vocab):
        out = dict(zip(names, session.run(names, {"logits": logits, "inv_t": inv_t}), strict=True))
        exact = out["exact"]
        k = graph.params["exact_blocks"]
        if exact.shape != (len(logits), k) or any(len(set(row)) != k for row in exact.tolist()):
            raise ExportError(
                f"{graph.name} parity failed on logits {list(logits.shape)}: exact is not "
                f"{k} distinct blocks per row"
            )
        want = envelope_reference(logits, inv_t, graph.params["width"], exact)
        out["exact_max"] = np.take_along_axis(out["block_max"], exact, axis=1)
        for what in ("block_max", "exact_max", "bound", "weights", "mass"):
            error = _error(out[what], want[what])
            if not error <= GRAPH_TOL:
                raise _fail(graph.name, what, error, logits.shape)
            worst = max(worst, error)
    return worst


def _require_equal(name: str, what: str, got: np.ndarray, want: np.ndarray, where: str) -> None:
    """ExportError unless graph `name`'s `what` is exactly model.onnx's (`want`)."""
    if not np.array_equal(got, want):
        raise ExportError(
            f"{name} {what} differ from model.onnx's {where} by "
            f"{float(np.abs(got - want).max()):.2e}: they must be equal"
        )


def check_step_softmax(graph: BuiltGraph, model_path: Path, config: LSTMConfig) -> float:
    """step_softmax gives exactly model.onnx's logits, hn and cn for the same feed, and
    weights and sums of those logits as `direct_reference`; the worst error of those."""
    model, fused = open_session(model_path), open_session(graph.model)
    rng = np.random.default_rng(SEED + 1)
    worst = 0.0
    for batch, seq in STEP_CASES:
        tokens = rng.integers(0, config.vocab_size, (batch, seq), dtype=np.int64)
        h, c = random_state(config, batch, rng)
        feeds = {"tokens": tokens, "h0": h, "c0": c}
        inv_t = np.exp(rng.uniform(np.log(0.1), np.log(10.0), (batch, 1))).astype(np.float32)
        expected = model.run(["logits", "hn", "cn"], feeds)
        got = fused.run(["logits", "hn", "cn", "weights", "sums"], {**feeds, "inv_t": inv_t})
        for what, a, b in zip(("logits", "hn", "cn"), got[:3], expected, strict=True):
            _require_equal(graph.name, what, a, b, f"on input {[batch, seq]}")
        want = direct_reference(expected[0], inv_t, graph.params["width"])
        for what, a, w in zip(("weights", "sums"), got[3:], want, strict=True):
            error = _error(a, w)
            if not error <= GRAPH_TOL:
                raise _fail(graph.name, what, error, expected[0].shape)
            worst = max(worst, error)
    return worst


PREFILL_CASES = (*STEP_CASES, (3, 40))  # (batch, seq): a long prompt too


def check_prefill(graph: BuiltGraph, model_path: Path, config: LSTMConfig) -> None:
    """prefill gives exactly model.onnx's hn and cn for the same feed."""
    model, state = open_session(model_path), open_session(graph.model)
    rng = np.random.default_rng(SEED + 3)
    for batch, seq in PREFILL_CASES:
        tokens = rng.integers(0, config.vocab_size, (batch, seq), dtype=np.int64)
        h, c = random_state(config, batch, rng)
        feeds = {"tokens": tokens, "h0": h, "c0": c}
        expected = model.run(["hn", "cn"], feeds)
        got = state.run(["hn", "cn"], feeds)
        for what, a, b in zip(("hn", "cn"), got, expected, strict=True):
            _require_equal(graph.name, what, a, b, f"on input {[batch, seq]}")


def check_decode_run(graph: BuiltGraph, model_path: Path, config: LSTMConfig) -> float:
    """decode_run against model.onnx stepped with the tokens it sampled: every step's
    state exactly model.onnx's, and every token one that softmax(logits * inv_t), in
    float64 and without the row's ban, puts at the row's number: its running
    probability before the token is at most u and after it at least u (within
    GRAPH_TOL). The worst miss, 0 when every u falls inside its token's interval."""
    model, run = open_session(model_path), open_session(graph.model)
    steps, vocab = graph.params["steps"], config.vocab_size
    rng = np.random.default_rng(SEED + 2)
    worst = 0.0
    for batch in CHECK_BATCHES:
        tokens = rng.integers(0, vocab, (batch, 1), dtype=np.int64)
        h, c = random_state(config, batch, rng)
        inv_t = np.exp(rng.uniform(np.log(0.1), np.log(10.0), (batch, 1))).astype(np.float32)
        ban = np.where(rng.random((batch, 1)) < 0.5, rng.integers(0, vocab, (batch, 1)), -1)
        u = rng.random((batch, steps))
        u[0, 0], u[-1, -1] = 0.0, 1.0 - 2.0**-53  # the ends of [0, 1)
        if batch > 2:
            inv_t[-2] = 1e4
        feeds = {"tokens": tokens, "h0": h, "c0": c, "inv_t": inv_t, "ban": ban, "uniforms": u}
        sampled, hs, cs = run.run(["sampled", "hs", "cs"], feeds)
        for k in range(steps):
            feed = tokens if k == 0 else sampled[:, k - 1 : k]
            logits, h, c = model.run(["logits", "hn", "cn"], {"tokens": feed, "h0": h, "c0": c})
            for what, a, b in (("hs", hs[k], h), ("cs", cs[k], c)):
                _require_equal(graph.name, what, a, b, f"at step {k}")
            scaled = (logits * inv_t).astype(np.float64)  # scaled in float32, as the graph
            rows = np.flatnonzero(ban[:, 0] >= 0)
            scaled[rows, ban[rows, 0]] = -np.inf
            probs = np.exp(scaled - scaled.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            after = np.cumsum(probs, axis=1)
            r, token = np.arange(batch), sampled[:, k]
            if not ((token >= 0) & (token < vocab)).all() or (probs[r, token] <= 0).any():
                raise ExportError(f"{graph.name} step {k} sampled a word of probability 0")
            miss = np.maximum(
                after[r, token] - probs[r, token] - u[:, k], u[:, k] - after[r, token]
            )
            error = float(miss.max(initial=0.0))
            if not error <= GRAPH_TOL:
                raise ExportError(
                    f"{graph.name} step {k} sampled a word whose interval misses its "
                    f"number by {error:.2e} (tolerance {GRAPH_TOL:g})"
                )
            worst = max(worst, error, 0.0)  # 0 when every u is inside
    return worst


def check_graphs(
    graphs: Mapping[str, BuiltGraph], model_path: Path, config: LSTMConfig
) -> dict[str, Any]:
    """Each graph's inputs and outputs as `simmer.bundle` expects them, then its parity
    check; the figures for the manifest. The first failure raises ExportError."""
    for name, graph in graphs.items():
        inputs, outputs = graph_contract(
            name, graph.params, config.vocab_size, config.hidden_size, config.num_layers
        )
        try:
            check_io(graph.file, _io(graph), inputs, outputs)
        except BundleError as exc:
            raise ExportError(str(exc)) from exc
    vocab = config.vocab_size
    checks: dict[str, Any] = {
        "tolerance": GRAPH_TOL,
        "batches": list(CHECK_BATCHES),
        "step_cases": [f"{b}x{s}" for b, s in STEP_CASES],
        "max_rel_error": {
            SAMPLING_DIRECT: check_direct(graphs[SAMPLING_DIRECT], vocab),
            SAMPLING_ENVELOPE: check_envelope(graphs[SAMPLING_ENVELOPE], vocab),
            STEP_SOFTMAX: check_step_softmax(graphs[STEP_SOFTMAX], model_path, config),
        },
        "step_softmax_state_equals_model": True,
    }
    if PREFILL in graphs:
        check_prefill(graphs[PREFILL], model_path, config)
        checks["prefill_state_equals_model"] = True
    if DECODE_RUN in graphs:
        # how far a drawn word's interval was from its number (0: every one inside)
        checks["decode_run_max_miss"] = check_decode_run(graphs[DECODE_RUN], model_path, config)
        checks["decode_run_state_equals_model"] = True
    return checks
