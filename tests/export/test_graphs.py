"""export.graphs: the sampling graphs pass onnx.checker, compute what numpy computes, and
step_softmax is the model graph unchanged plus softmax weights; the bundle lists them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from export.graphs import (
    RUN_STEPS,
    BuiltGraph,
    block_params,
    build_graphs,
    check_direct,
    check_envelope,
    check_graphs,
    direct_graph,
    envelope_graph,
    step_softmax_graph,
)
from export.onnx_export import ExportError
from export.parity import random_state
from export.runtime import open_session
from simmer.bundle import (
    DECODE_RUN,
    GRAPHS,
    PREFILL,
    SAMPLING_DIRECT,
    SAMPLING_ENVELOPE,
    SEQUENCE_LOGPROBS,
    STEP_SOFTMAX,
    graph_io,
    load_bundle,
    sha256_file,
)
from training.model import RecipeLSTM

VOCABS = (1, 2, 17, 100, 1234)  # 100 is a perfect square: no padded block
TOL = 1e-5


def softmax_blocks(
    logits: np.ndarray, inv_t: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """softmax(logits * inv_t) per row, zero-padded to whole blocks, and the block sums."""
    rows, vocab = logits.shape
    blocks = -(-vocab // width)
    scaled = logits.astype(np.float64) * inv_t
    p = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    weights = np.concatenate([p, np.zeros((rows, blocks * width - vocab))], axis=1)
    return weights, weights.reshape(rows, blocks, width).sum(axis=2)


def random_logits(rows: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    inv_t = rng.uniform(0.2, 5.0, (rows, 1)).astype(np.float32)
    return logits, inv_t


def close(got: np.ndarray, want: np.ndarray) -> bool:
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=TOL, atol=TOL))


@pytest.mark.parametrize("opset", [13, 17, 18])
@pytest.mark.parametrize("vocab", VOCABS)
def test_the_sampling_graphs_pass_the_full_onnx_check_at_every_opset_from_13(
    vocab: int, opset: int
) -> None:
    p = block_params(vocab)
    for model in (
        direct_graph(vocab, p["width"], opset),
        envelope_graph(vocab, p["width"], p["exact_blocks"], opset),
    ):
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == opset


@pytest.mark.parametrize("rows", [1, 40])
@pytest.mark.parametrize("vocab", VOCABS)
def test_the_direct_graph_gives_softmax_weights_and_block_sums(vocab: int, rows: int) -> None:
    width = block_params(vocab)["width"]
    session = open_session(direct_graph(vocab, width, 17).SerializeToString())
    logits, inv_t = random_logits(rows, vocab)
    weights, sums = session.run(["weights", "sums"], {"logits": logits, "inv_t": inv_t})
    want_weights, want_sums = softmax_blocks(logits, inv_t, width)
    assert close(weights, want_weights)
    assert close(sums, want_sums)
    assert (weights[:, vocab:] == 0).all()  # the padding of the last block weighs nothing


@pytest.mark.parametrize("rows", [1, 40])
@pytest.mark.parametrize("vocab", VOCABS)
def test_the_envelope_graph_gives_block_maxima_bounds_and_exact_top_blocks(
    vocab: int, rows: int
) -> None:
    p = block_params(vocab)
    width, blocks, k = p["width"], p["blocks"], p["exact_blocks"]
    assert k == min(8, blocks)
    session = open_session(envelope_graph(vocab, width, k, 17).SerializeToString())
    logits, inv_t = random_logits(rows, vocab, seed=1)
    block_max, bound, exact, weights, mass = session.run(
        ["block_max", "bound", "exact", "weights", "mass"], {"logits": logits, "inv_t": inv_t}
    )
    padded = np.full((rows, blocks * width), -np.inf)
    padded[:, :vocab] = logits
    blocked = padded.reshape(rows, blocks, width)
    want_max = blocked.max(axis=2)
    top = want_max.max(axis=1, keepdims=True)
    assert np.array_equal(block_max, want_max.astype(np.float32))
    assert close(bound, np.exp((want_max - top) * inv_t))
    # random logits have no ties: the k largest block maxima, largest first
    assert exact.dtype == np.int64
    assert np.array_equal(exact, np.argsort(-want_max, axis=1, kind="stable")[:, :k])
    words = blocked[np.arange(rows)[:, None], exact]  # (B, k, width)
    want_weights = np.exp((words - top[:, :, None]) * inv_t[:, :, None])
    assert close(weights, want_weights)
    assert close(mass, want_weights.sum(axis=2))


def test_the_envelope_graph_picks_distinct_blocks_when_every_logit_ties() -> None:
    vocab = 50
    p = block_params(vocab)
    graph = BuiltGraph(
        SAMPLING_ENVELOPE,
        envelope_graph(vocab, p["width"], p["exact_blocks"], 17).SerializeToString(),
        p,
    )
    session = open_session(graph.model)
    exact = session.run(
        ["exact"],
        {"logits": np.zeros((3, vocab), np.float32), "inv_t": np.ones((3, 1), np.float32)},
    )[0]
    assert all(len(set(row)) == p["exact_blocks"] for row in exact.tolist())
    assert check_envelope(graph, vocab) <= TOL  # the export's own check has a tied row


def step_feeds(model: RecipeLSTM, batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 100 + seq)
    h, c = random_state(model.config, batch, rng)
    tokens = rng.integers(0, model.config.vocab_size, (batch, seq), dtype=np.int64)
    return {"tokens": tokens, "h0": h, "c0": c}


@pytest.mark.parametrize(("batch", "seq"), [(1, 1), (40, 1), (3, 12)])
def test_step_softmax_is_the_model_step_plus_the_softmax_of_its_logits(
    tiny_onnx: Path, tiny_model: RecipeLSTM, batch: int, seq: int
) -> None:
    vocab = tiny_model.config.vocab_size
    width = block_params(vocab)["width"]
    fused = step_softmax_graph(onnx.load(str(tiny_onnx)), vocab, width)
    onnx.checker.check_model(fused, full_check=True)
    model, step = open_session(tiny_onnx), open_session(fused.SerializeToString())
    feeds = step_feeds(tiny_model, batch, seq)
    inv_t = np.linspace(0.25, 4.0, batch, dtype=np.float32).reshape(batch, 1)
    logits, hn, cn = model.run(["logits", "hn", "cn"], feeds)
    got = step.run(["logits", "hn", "cn", "weights", "sums"], {**feeds, "inv_t": inv_t})
    assert np.array_equal(got[0], logits)
    assert np.array_equal(got[1], hn)
    assert np.array_equal(got[2], cn)
    want_weights, want_sums = softmax_blocks(logits, inv_t, width)
    assert close(got[3], want_weights)
    assert close(got[4], want_sums)


def test_step_softmax_keeps_the_models_initializers_and_nodes(tiny_onnx: Path) -> None:
    model = onnx.load(str(tiny_onnx))
    vocab = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    fused = step_softmax_graph(model, vocab, block_params(vocab)["width"])
    assert list(fused.graph.initializer)[: len(model.graph.initializer)] == list(
        model.graph.initializer
    )
    assert list(fused.graph.node)[: len(model.graph.node)] == list(model.graph.node)
    assert fused.opset_import == model.opset_import
    assert [i.name for i in fused.graph.input] == ["tokens", "h0", "c0", "inv_t"]
    assert [o.name for o in fused.graph.output] == ["logits", "hn", "cn", "weights", "sums"]


def rename_value(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


def test_step_softmax_avoids_names_the_model_already_uses(
    tiny_onnx: Path, tiny_model: RecipeLSTM
) -> None:
    model = onnx.load(str(tiny_onnx))
    internal = next(
        name
        for node in model.graph.node
        for name in node.output
        if name not in ("logits", "hn", "cn")
    )
    rename_value(model, internal, "sampling/scaled")  # what the first added node would be called
    model.graph.node[0].name = "sampling/Mul"
    vocab = tiny_model.config.vocab_size
    width = block_params(vocab)["width"]
    fused = step_softmax_graph(model, vocab, width)
    onnx.checker.check_model(fused, full_check=True)
    names = [name for node in fused.graph.node for name in node.output]
    assert len(names) == len(set(names))
    feeds = step_feeds(tiny_model, 2, 3)
    inv_t = np.ones((2, 1), np.float32)
    logits = open_session(tiny_onnx).run(["logits"], feeds)[0]
    got = open_session(fused.SerializeToString()).run(
        ["logits", "weights"], {**feeds, "inv_t": inv_t}
    )
    assert np.array_equal(got[0], logits)
    assert close(got[1], softmax_blocks(logits, inv_t, width)[0])


def test_step_softmax_refuses_a_model_that_uses_its_public_names(tiny_onnx: Path) -> None:
    model = onnx.load(str(tiny_onnx))
    rename_value(model, model.graph.node[0].output[0], "weights")
    with pytest.raises(ExportError, match=r"already uses \['weights'\]"):
        step_softmax_graph(model, 100, 10)


def test_graphs_below_opset_13_are_refused_with_one_line() -> None:
    with pytest.raises(ExportError, match="need opset 13 or later") as caught:
        direct_graph(10, 4, 12)
    assert "\n" not in str(caught.value)


def test_a_graph_that_disagrees_with_numpy_fails_the_export_check() -> None:
    vocab = 30
    p = block_params(vocab)
    model = direct_graph(vocab, p["width"], 17)
    mul = next(node for node in model.graph.node if node.op_type == "Mul")
    mul.op_type = "Add"  # logits + inv_t: same shapes, wrong weights
    params = {"width": p["width"], "blocks": p["blocks"]}
    graph = BuiltGraph(SAMPLING_DIRECT, model.SerializeToString(), params)
    with pytest.raises(ExportError, match="sampling_direct parity failed") as caught:
        check_direct(graph, vocab)
    assert "\n" not in str(caught.value)


def test_the_export_check_refuses_graphs_with_the_wrong_shapes(
    tiny_onnx: Path, tiny_model: RecipeLSTM
) -> None:
    config = tiny_model.config
    graphs = build_graphs(tiny_onnx, config.vocab_size)
    p = block_params(config.vocab_size)
    wider = direct_graph(config.vocab_size, p["width"] + 1, 17).SerializeToString()
    graphs[SAMPLING_DIRECT] = BuiltGraph(SAMPLING_DIRECT, wider, graphs[SAMPLING_DIRECT].params)
    with pytest.raises(ExportError, match=r"shape disagrees: sampling_direct\.onnx weights"):
        check_graphs(graphs, tiny_onnx, config)


def manifest_of(bundle: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((bundle / "manifest.json").read_text())
    return data


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_the_bundle_ships_every_graph_listed_with_hash_shapes_and_params(
    kind: str, tiny_bundle: Path, int8_bundle: Path, tiny_model: RecipeLSTM
) -> None:
    bundle = tiny_bundle if kind == "fp32" else int8_bundle
    config = tiny_model.config
    p = block_params(config.vocab_size)
    manifest = manifest_of(bundle)
    entries = manifest[GRAPHS]
    assert set(entries) == {
        STEP_SOFTMAX,
        SAMPLING_DIRECT,
        SAMPLING_ENVELOPE,
        DECODE_RUN,
        PREFILL,
        SEQUENCE_LOGPROBS,
    }
    assert entries[SAMPLING_ENVELOPE]["params"] == p
    assert entries[PREFILL]["params"] == {}
    assert set(entries[PREFILL]["outputs"]) == {"hn", "cn"}
    assert entries[DECODE_RUN]["params"] == {
        "width": p["width"],
        "blocks": p["blocks"],
        "steps": RUN_STEPS,
    }
    for name in (STEP_SOFTMAX, SAMPLING_DIRECT):
        assert entries[name]["params"] == {"width": p["width"], "blocks": p["blocks"]}
    for name, entry in entries.items():
        file = bundle / entry["file"]
        assert entry["file"] == f"{name}.onnx"
        assert entry["sha256"] == sha256_file(file)
        io = graph_io(file)
        assert entry["inputs"] == {t: list(shape) for t, (_, shape) in io.inputs.items()}
        assert entry["outputs"] == {t: list(shape) for t, (_, shape) in io.outputs.items()}
        onnx.checker.check_model(str(file), full_check=True)
    step = entries[STEP_SOFTMAX]
    assert step["inputs"]["inv_t"] == ["batch", 1]
    assert step["outputs"]["weights"] == ["batch", p["blocks"] * p["width"]]
    assert step["outputs"]["sums"] == ["batch", p["blocks"]]
    assert step["outputs"]["logits"] == ["batch", config.vocab_size]
    envelope = entries[SAMPLING_ENVELOPE]["outputs"]
    assert envelope["weights"] == ["batch", p["exact_blocks"], p["width"]]
    checks = manifest["parity"]["graphs"]
    assert checks["step_softmax_state_equals_model"] is True
    assert checks["prefill_state_equals_model"] is True
    assert all(error <= checks["tolerance"] for error in checks["max_rel_error"].values())
    # the files section still lists exactly the model and the tokenizer
    assert set(manifest["files"]) == {"model.onnx", "tokenizer.json"}

    loaded = load_bundle(bundle)
    for name, entry in entries.items():
        info = loaded.graph(name)
        assert info is not None
        assert info.path == bundle / entry["file"]
        assert dict(info.params) == entry["params"]


def test_the_int8_bundles_step_softmax_gives_the_int8_models_logits(
    int8_bundle: Path, tiny_model: RecipeLSTM
) -> None:
    feeds = step_feeds(tiny_model, 5, 4)
    inv_t = np.full((5, 1), 0.7, np.float32)
    logits, hn = open_session(int8_bundle / "model.onnx").run(["logits", "hn"], feeds)
    got = open_session(int8_bundle / "step_softmax.onnx").run(
        ["logits", "hn", "weights"], {**feeds, "inv_t": inv_t}
    )
    assert np.array_equal(got[0], logits)
    assert np.array_equal(got[1], hn)
    width = block_params(tiny_model.config.vocab_size)["width"]
    assert close(got[2], softmax_blocks(logits, inv_t, width)[0])
