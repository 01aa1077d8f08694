"""Serialize a small ONNX graph without the `onnx` package.

The service builds one tiny graph at start-up (the sampling head in
`service.sampling`) and hands its bytes to onnxruntime. Serving must not depend on
the `onnx` package, and ONNX files are never committed, so this module writes the few
protobuf messages that graph needs straight in the protobuf wire format:
ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto and ValueInfoProto.
Field numbers are those of onnx/onnx.proto.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IR_VERSION = 8  # onnxruntime >= 1.14 reads it; enough for opset 18
FLOAT = 1  # TensorProto.DataType
INT64 = 7
_ATTR_FLOAT = 1  # AttributeProto.AttributeType
_ATTR_INT = 2
_ATTR_INTS = 7

Dim = int | str  # a fixed size, or a symbolic one such as "batch"


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 values are written as 10-byte two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _str(field: int, text: str) -> bytes:
    return _bytes(field, text.encode())


def _float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


@dataclass(frozen=True)
class Node:
    op_type: str
    inputs: Sequence[str]
    outputs: Sequence[str]
    attributes: dict[str, int | float | Sequence[int]] | None = None

    def encode(self) -> bytes:
        out = b"".join(_str(1, name) for name in self.inputs)
        out += b"".join(_str(2, name) for name in self.outputs)
        out += _str(4, self.op_type)
        for name, value in (self.attributes or {}).items():
            if isinstance(value, bool | int):
                attr = _str(1, name) + _int(3, int(value)) + _int(20, _ATTR_INT)
            elif isinstance(value, float):
                attr = _str(1, name) + _float(2, value) + _int(20, _ATTR_FLOAT)
            else:
                attr = _str(1, name) + b"".join(_int(8, v) for v in value) + _int(20, _ATTR_INTS)
            out += _bytes(5, attr)
        return out


def tensor(name: str, array: np.ndarray) -> bytes:
    """A TensorProto initializer holding `array` (float32 or int64) as raw little-endian data."""
    kinds = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64}
    data_type = kinds[array.dtype]
    out = b"".join(_int(1, d) for d in array.shape)
    out += _int(2, data_type) + _str(8, name)
    out += _bytes(9, np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())
    return out


def value_info(name: str, elem_type: int, dims: Sequence[Dim]) -> bytes:
    """A ValueInfoProto: a named tensor of `elem_type` with fixed or symbolic dims."""
    shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _str(2, d)) for d in dims)
    tensor_type = _int(1, elem_type) + _bytes(2, shape)
    return _str(1, name) + _bytes(2, _bytes(1, tensor_type))


@dataclass(frozen=True)
class Graph:
    """Nodes with the inputs, outputs and initializers they add to a graph."""

    nodes: Sequence[Node]
    inputs: Sequence[bytes]  # value_info()
    outputs: Sequence[bytes]
    initializers: Sequence[bytes] = ()

    def encode(self) -> bytes:
        """The GraphProto fields (not a whole GraphProto: no name)."""
        out = b"".join(_bytes(1, node.encode()) for node in self.nodes)
        out += b"".join(_bytes(5, init) for init in self.initializers)
        out += b"".join(_bytes(11, vi) for vi in self.inputs)
        return out + b"".join(_bytes(12, vi) for vi in self.outputs)


def extend(model_bytes: bytes, graph: Graph) -> bytes:
    """`model_bytes` (a serialized ModelProto) with `graph`'s nodes, inputs, outputs and
    initializers added to its graph.

    Protobuf merges a message field that occurs twice, appending repeated fields, so a
    second `graph` field after the model's own adds to it without parsing the model.
    The added nodes must be valid at the model's opset.
    """
    return model_bytes + _bytes(7, graph.encode())


def model(
    nodes: Sequence[Node],
    inputs: Sequence[bytes],
    outputs: Sequence[bytes],
    initializers: Sequence[bytes] = (),
    opset: int = 18,
    name: str = "graph",
) -> bytes:
    """A serialized ModelProto with one graph in the default ONNX domain."""
    graph = _str(2, name) + Graph(nodes, inputs, outputs, initializers).encode()
    opset_import = _str(1, "") + _int(2, opset)
    return _int(1, IR_VERSION) + _str(2, "simmer") + _bytes(7, graph) + _bytes(8, opset_import)
