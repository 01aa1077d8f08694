"""export.graphs' prefill graph: model.onnx without its output layer, the same state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from export.graphs import BuiltGraph, build_graphs, check_graphs, check_prefill, prefill_graph
from export.onnx_export import ExportError
from export.parity import random_state
from export.runtime import open_session
from simmer.bundle import PREFILL
from training.model import RecipeLSTM


@pytest.mark.parametrize(("batch", "seq"), [(1, 1), (1, 30), (7, 5)])
def test_prefill_gives_exactly_the_models_state(
    tiny_onnx: Path, tiny_model: RecipeLSTM, batch: int, seq: int
) -> None:
    rng = np.random.default_rng(batch * 100 + seq)
    h, c = random_state(tiny_model.config, batch, rng)
    tokens = rng.integers(0, tiny_model.config.vocab_size, (batch, seq), dtype=np.int64)
    feeds = {"tokens": tokens, "h0": h, "c0": c}
    state = prefill_graph(onnx.load(str(tiny_onnx)))
    onnx.checker.check_model(state, full_check=True)
    want = open_session(tiny_onnx).run(["hn", "cn"], feeds)
    got = open_session(state.SerializeToString()).run(["hn", "cn"], feeds)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_prefill_drops_the_output_layer_and_keeps_the_rest_of_the_model(tiny_onnx: Path) -> None:
    model = onnx.load(str(tiny_onnx))
    state = prefill_graph(model)
    assert [o.name for o in state.graph.output] == ["hn", "cn"]
    assert [i.name for i in state.graph.input] == ["tokens", "h0", "c0"]
    assert state.opset_import == model.opset_import
    # fewer nodes and fewer weights: the output layer's are gone, the LSTM's stay
    assert 0 < len(state.graph.node) < len(model.graph.node)
    kept = {init.name for init in state.graph.initializer}
    dropped = [init for init in model.graph.initializer if init.name not in kept]
    assert dropped and all(init in model.graph.initializer for init in state.graph.initializer)
    vocab = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    assert any(vocab in init.dims for init in dropped)  # the (vocab, hidden) output weights
    head = ("Gemm", "MatMul", "MatMulInteger", "DynamicQuantizeLinear")
    assert any(node.op_type in head for node in model.graph.node)
    assert not any(node.op_type in head for node in state.graph.node)


def test_a_prefill_graph_whose_state_differs_fails_the_export_check(
    tiny_onnx: Path, tiny_model: RecipeLSTM
) -> None:
    state = prefill_graph(onnx.load(str(tiny_onnx)))
    lstm = next(node for node in state.graph.node if node.op_type == "LSTM")
    # clip the cell: the same shapes and types, a different state
    lstm.attribute.append(onnx.helper.make_attribute("clip", 0.01))
    graph = BuiltGraph(PREFILL, state.SerializeToString(), {})
    with pytest.raises(ExportError, match=r"prefill [hc]n differ from model\.onnx's") as caught:
        check_prefill(graph, tiny_onnx, tiny_model.config)
    assert "\n" not in str(caught.value)


def test_a_prefill_graph_that_cannot_be_built_is_skipped_with_one_line(
    tiny_onnx: Path,
    tiny_model: RecipeLSTM,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = onnx.load(str(tiny_onnx))
    del model.graph.output[1:]  # logits alone
    with pytest.raises(ExportError, match="no 'hn' and 'cn' outputs"):
        prefill_graph(model)

    def refuse(model: onnx.ModelProto) -> onnx.ModelProto:
        raise ExportError("the model graph has no 'hn' and 'cn' outputs")

    monkeypatch.setattr("export.graphs.prefill_graph", refuse)
    graphs = build_graphs(tiny_onnx, tiny_model.config.vocab_size)
    assert PREFILL not in graphs
    assert capsys.readouterr().err == (
        "export: prefill skipped: the model graph has no 'hn' and 'cn' outputs\n"
    )
    checks = check_graphs(graphs, tiny_onnx, tiny_model.config)  # the rest still check
    assert "prefill_state_equals_model" not in checks


def test_the_int8_bundles_prefill_gives_the_int8_models_state_without_its_output_layer(
    int8_bundle: Path, tiny_model: RecipeLSTM
) -> None:
    model, state = (
        onnx.load(str(int8_bundle / "model.onnx")),
        onnx.load(str(int8_bundle / "prefill.onnx")),
    )
    vocab = tiny_model.config.vocab_size
    kept = {init.name for init in state.graph.initializer}
    dropped = [init for init in model.graph.initializer if init.name not in kept]
    assert any(vocab in init.dims for init in dropped)  # the int8 output layer's weights
    head = ("Gemm", "MatMul", "MatMulInteger", "DynamicQuantizeLinear")
    assert any(node.op_type in head for node in model.graph.node)
    assert not any(node.op_type in head for node in state.graph.node)
    rng = np.random.default_rng(5)
    h, c = random_state(tiny_model.config, 3, rng)
    tokens = rng.integers(0, vocab, (3, 8), dtype=np.int64)
    feeds = {"tokens": tokens, "h0": h, "c0": c}
    want = open_session(int8_bundle / "model.onnx").run(["hn", "cn"], feeds)
    got = open_session(int8_bundle / "prefill.onnx").run(["hn", "cn"], feeds)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_prefill_leaves_out_the_lstm_sequence_nobody_reads(tiny_onnx: Path) -> None:
    state = prefill_graph(onnx.load(str(tiny_onnx)))
    lstms = [node for node in state.graph.node if node.op_type == "LSTM"]
    read = {name for node in state.graph.node for name in node.input} | {"hn", "cn"}
    assert lstms and lstms[-1].output[0] == ""  # the last layer's Y fed the output layer
    assert all(name in read for node in lstms for name in node.output if name)
