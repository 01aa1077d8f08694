"""The hand-written ONNX graphs are valid ONNX and compute what they say."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service import onnx_writer as ox
from service.sampling import direct_graph, envelope_graph


def _run(graph: bytes, **feeds: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)  # type: ignore[no-any-return]


def test_a_written_model_passes_the_onnx_checker() -> None:
    graph = ox.model(
        [
            ox.Node("Mul", ["x", "two"], ["y"]),
            ox.Node("ReduceSum", ["y", "axes"], ["s"], {"keepdims": 0}),
        ],
        inputs=[ox.value_info("x", ox.FLOAT, ["batch", 3])],
        outputs=[ox.value_info("s", ox.FLOAT, ["batch"])],
        initializers=[
            ox.tensor("two", np.array(2.0, np.float32)),
            ox.tensor("axes", np.array([1], np.int64)),
        ],
    )
    onnx.checker.check_model(onnx.load_from_string(graph), full_check=True)
    (total,) = _run(graph, x=np.array([[1, 2, 3], [4, 5, 6]], np.float32))
    assert total.tolist() == [12.0, 30.0]


@pytest.mark.parametrize(("vocab", "width"), [(400, 20), (397, 20)])
def test_direct_graph_is_softmax_over_t_with_block_sums(vocab: int, width: int) -> None:
    graph = direct_graph(vocab, width)
    onnx.checker.check_model(onnx.load_from_string(graph), full_check=True)
    logits = np.random.default_rng(0).standard_normal((5, vocab)).astype(np.float32)
    inv_t = np.array([[1.0], [2.0], [0.5], [1.0], [3.0]], np.float32)
    weights, sums = _run(graph, logits=logits, inv_t=inv_t)
    scaled = logits.astype(np.float64) * inv_t
    expected = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    assert np.allclose(weights[:, :vocab], expected, atol=1e-6)
    assert not weights[:, vocab:].any()  # padding has no weight
    assert np.allclose(sums, weights.reshape(5, -1, width).sum(axis=2), atol=1e-6)


@pytest.mark.parametrize(("vocab", "width"), [(400, 20), (397, 20)])
def test_envelope_graph_gives_block_maxima_bounds_and_exact_blocks(vocab: int, width: int) -> None:
    graph = envelope_graph(vocab, width, 3)
    onnx.checker.check_model(onnx.load_from_string(graph), full_check=True)
    logits = np.random.default_rng(1).standard_normal((4, vocab)).astype(np.float32)
    inv_t = np.array([[1.0], [2.0], [0.5], [1.0]], np.float32)
    block_max, bound, exact, weights, mass = _run(graph, logits=logits, inv_t=inv_t)
    padded = np.full((4, block_max.shape[1] * width), -np.inf, np.float32)
    padded[:, :vocab] = logits
    blocks = padded.reshape(4, -1, width)
    top = logits.max(axis=1, keepdims=True)
    assert np.array_equal(block_max, blocks.max(axis=2))
    assert np.allclose(bound, np.exp((block_max - top) * inv_t), atol=1e-6)
    assert np.array_equal(
        np.sort(exact, axis=1), np.sort(np.argsort(-block_max, axis=1)[:, :3], axis=1)
    )
    rows = np.arange(4)[:, None]
    expected = np.exp((blocks[rows, exact] - top[:, :, None]) * inv_t[:, :, None])
    assert np.allclose(weights, expected, atol=1e-6)
    assert np.allclose(mass, expected.sum(axis=2), atol=1e-5)
