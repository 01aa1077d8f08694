"""int8 dynamic quantisation of the step graph that keeps every row independent.

    python -m export --checkpoint DIR --out BUNDLE --quantize int8 --data PATH

What is quantised:
- the embedding: int8 rows, one scale per word (weights only);
- the output layer, which holds most of the weights and most of the work: 7-bit weights
  with one scale per word, and its input, the last hidden state, quantised at run time
  to int8 with one scale per batch row (symmetric: the row's max |h| / 127);
- the LSTM stays fp32: 5% of the book model's weights and of its work at seq = 1.

Why not onnxruntime's `quantize_dynamic`: it quantises activations with one scale for
the whole tensor (DynamicQuantizeLSTM does so at every time step), so a row's logits
depend on the other rows in the batch and on how a sequence is split into calls. That
breaks continuous batching (a seeded request changes with its neighbours) and fails the
batch-independence and incremental checks in `export.parity`.

Why 7-bit weights: on x86 CPUs without VNNI, onnxruntime's uint8 x int8 kernel adds
pairs of products in saturating 16-bit arithmetic (255 * 127 * 2 > 32767) and gets large
activations wrong; with |w| <= 63 the sum fits (onnxruntime's `reduce_range`).

The output layer is written with standard ops, scaling by the row scale before the word
scale: onnxruntime fuses `Mul(Cast(MatMulInteger), Mul(row_scale, word_scale)) + bias`
into MatMulIntegerToFloat, which (1.32) also multiplies the bias by the row scale. The
price is that the scaling runs as separate passes over (B, V) after the integer GEMM, so
int8 gains most at small batches; `quantization.step_ms` in the manifest has the figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from export.onnx_export import ExportError
from training.model import RecipeLSTM, State

TINY = 1e-30  # floor for a row's max |h|, so that an all-zero row quantises to zeros
QMAX = 127.0  # activations and embedding rows: int8
QMAX_HEAD = 63.0  # output-layer weights: 7 bits, see above


def quantize_rows(weight: np.ndarray, qmax: float = QMAX) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per row: q int8 (N, K) in [-qmax, qmax] and scale (N,), weight ~ q * scale."""
    absmax = np.abs(weight).max(axis=1)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.round(weight / scale[:, None]), -qmax, qmax).astype(np.int8)
    return q, scale


@dataclass(frozen=True)
class Int8Weights:
    embedding: np.ndarray  # (V, E) int8
    embedding_scale: np.ndarray  # (V,) float32
    head: np.ndarray  # (V, H) int8 in [-63, 63]
    head_scale: np.ndarray  # (V,) float32
    head_bias: np.ndarray  # (V,) float32

    @classmethod
    def from_model(cls, model: RecipeLSTM) -> Int8Weights:
        with torch.no_grad():
            embedding, embedding_scale = quantize_rows(model.embedding.weight.numpy())
            head, head_scale = quantize_rows(model.head.weight.numpy(), QMAX_HEAD)
            bias = model.head.bias.numpy().astype(np.float32)
        return cls(embedding, embedding_scale, head, head_scale, bias)


class Int8Reference(nn.Module):
    """The quantised model in torch, for the parity checks: RecipeLSTM's forward with the
    dequantised embedding and the int8 output layer."""

    def __init__(self, model: RecipeLSTM, weights: Int8Weights) -> None:
        super().__init__()
        self.lstm = model.lstm
        self.embedding = torch.from_numpy(
            weights.embedding.astype(np.float32) * weights.embedding_scale[:, None]
        )
        self.head_q = torch.from_numpy(weights.head.astype(np.float32))  # (V, H), exact in fp32
        self.head_scale = torch.from_numpy(weights.head_scale)
        self.head_bias = torch.from_numpy(weights.head_bias)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The int8 output layer, as the graph computes it: hidden (..., H) -> logits (..., V)."""
        scale = torch.clamp(h.abs().amax(dim=-1, keepdim=True), min=TINY) / QMAX  # (..., 1)
        q = torch.round(h / scale)  # (..., H), integers in [-127, 127]
        return (q @ self.head_q.T) * scale * self.head_scale + self.head_bias

    def forward(
        self, tokens: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, State]:
        x = self.embedding[tokens]  # (B, T, E)
        out, (h, c) = self.lstm(x, state)  # (B, T, H)
        return self.head(out), (h, c)  # (B, T, V)


def _initializer_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    return {init.name: tuple(init.dims) for init in graph.initializer}


def _find(graph: onnx.GraphProto, op_type: str, weight_shape: tuple[int, ...]) -> onnx.NodeProto:
    shapes = _initializer_shapes(graph)
    found: list[onnx.NodeProto] = [
        node
        for node in graph.node
        if node.op_type == op_type and any(shapes.get(name) == weight_shape for name in node.input)
    ]
    if len(found) != 1:
        raise ExportError(
            f"int8: expected one {op_type} with a {list(weight_shape)} weight, found {len(found)}"
        )
    return found[0]


def write_int8_graph(fp32_path: Path, weights: Int8Weights, out_path: Path) -> None:
    """Rewrite the exported fp32 step graph: the embedding Gather and the output Gemm
    become their int8 versions; inputs, outputs and the LSTM are unchanged."""
    model = onnx.load(str(fp32_path))
    graph = model.graph
    opset = next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))
    if opset < 13:
        raise ExportError(f"int8 needs opset 13 or later, not {opset}")
    vocab, embedding_dim = weights.embedding.shape
    hidden = weights.head.shape[1]
    gather = _find(graph, "Gather", (vocab, embedding_dim))
    gemm = _find(graph, "Gemm", (vocab, hidden))
    attributes = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    plain = attributes.get("alpha", 1.0) == attributes.get("beta", 1.0) == 1.0
    if attributes.get("transB") != 1 or attributes.get("transA", 0) != 0 or not plain:
        raise ExportError("int8: the output layer is not Gemm(x, W, b, transB=1)")
    tokens, hidden_last = gather.input[1], gemm.input[0]

    constants = {
        "int8.embedding": weights.embedding,
        "int8.embedding_scale": weights.embedding_scale[:, None],  # (V, 1)
        "int8.head": np.ascontiguousarray(weights.head.T),  # (H, V)
        "int8.head_scale": weights.head_scale,
        "int8.head_bias": weights.head_bias,
        "int8.zero_point": np.array(128, np.uint8),
        "int8.zero_point_f": np.array(128.0, np.float32),
        "int8.qmax": np.array(QMAX, np.float32),
        "int8.tiny": np.array(TINY, np.float32),
    }
    node = helper.make_node
    reduce_max = (
        node("ReduceMax", ["int8.h_abs"], ["int8.h_absmax"], axes=[-1], keepdims=1)
        if opset < 18
        else node("ReduceMax", ["int8.h_abs", "int8.last_axis"], ["int8.h_absmax"], keepdims=1)
    )
    if opset >= 18:
        constants["int8.last_axis"] = np.array([-1], np.int64)
    embedding_nodes = [
        node("Gather", ["int8.embedding", tokens], ["int8.emb_q"]),  # (B, T, E) int8
        node("Gather", ["int8.embedding_scale", tokens], ["int8.emb_scale"]),  # (B, T, 1)
        node("Cast", ["int8.emb_q"], ["int8.emb_f"], to=TensorProto.FLOAT),
        node("Mul", ["int8.emb_f", "int8.emb_scale"], [gather.output[0]]),
    ]
    head_nodes = [
        node("Abs", [hidden_last], ["int8.h_abs"]),
        reduce_max,  # (B, 1)
        node("Max", ["int8.h_absmax", "int8.tiny"], ["int8.h_absmax_floor"]),
        node("Div", ["int8.h_absmax_floor", "int8.qmax"], ["int8.h_scale"]),  # (B, 1)
        node("Div", [hidden_last, "int8.h_scale"], ["int8.h_div"]),
        node("Round", ["int8.h_div"], ["int8.h_round"]),  # (B, H) in [-127, 127]
        node("Add", ["int8.h_round", "int8.zero_point_f"], ["int8.h_shift"]),
        node("Cast", ["int8.h_shift"], ["int8.h_q"], to=TensorProto.UINT8),
        node(
            "MatMulInteger",
            ["int8.h_q", "int8.head", "int8.zero_point"],
            ["int8.acc"],
        ),  # (B, V) int32
        node("Cast", ["int8.acc"], ["int8.acc_f"], to=TensorProto.FLOAT),
        node(
            "Mul", ["int8.acc_f", "int8.h_scale"], ["int8.row_scaled"]
        ),  # row scale first: see above
        node("Mul", ["int8.row_scaled", "int8.head_scale"], ["int8.scaled"]),
        node("Add", ["int8.scaled", "int8.head_bias"], [gemm.output[0]]),
    ]
    nodes: list[onnx.NodeProto] = []
    for old in graph.node:
        if old is gather:
            nodes.extend(embedding_nodes)
        elif old is gemm:
            nodes.extend(head_nodes)
        else:
            nodes.append(old)
    replaced = {gather.input[0], *gemm.input[1:]}
    still_used = {name for n in nodes for name in n.input}
    initializers = [
        init for init in graph.initializer if init.name not in replaced or init.name in still_used
    ]
    initializers += [numpy_helper.from_array(value, name) for name, value in constants.items()]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    onnx.save(model, str(out_path))
