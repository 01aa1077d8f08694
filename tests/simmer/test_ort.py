"""simmer.ort: every session opens with the same options, and fast_run runs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from simmer.ort import GraphLoadError, fast_run, open_session, session_options


def add_one() -> bytes:
    """y = x + 1 for x float32 (batch, 3)."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "add_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [one],
    )
    opsets = [helper.make_opsetid("", 17)]
    model = helper.make_model(
        graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets)
    )
    data: bytes = model.SerializeToString()
    return data


@pytest.mark.parametrize("threads", [0, 1, 4])
def test_session_options_run_sequentially_without_spinning_threads(threads: int) -> None:
    options = session_options(threads)
    assert options.intra_op_num_threads == threads
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.log_severity_level == 3


def test_a_session_opens_from_bytes_or_a_file_with_those_options(tmp_path: Path) -> None:
    path = tmp_path / "add_one.onnx"
    path.write_bytes(add_one())
    for model in (add_one(), path):
        session = open_session(model, intra_op_threads=2, level="ORT_DISABLE_ALL")
        options = session.get_session_options()
        assert options.intra_op_num_threads == 2
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert session.get_providers() == ["CPUExecutionProvider"]
        (y,) = session.run(None, {"x": np.zeros((2, 3), np.float32)})
        assert np.array_equal(y, np.ones((2, 3), np.float32))


def test_the_default_level_is_the_services(tmp_path: Path) -> None:
    options = open_session(add_one()).get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == 1


def test_an_optimized_model_is_saved_where_asked(tmp_path: Path) -> None:
    out = tmp_path / "optimized.onnx"
    open_session(add_one(), level="ORT_ENABLE_EXTENDED", optimized_model=out)
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["y"]


@pytest.mark.parametrize(
    ("model", "level", "expected"),
    [
        (b"not a model", "ORT_ENABLE_ALL", "onnxruntime cannot load graph: "),
        (Path("/no/such/model.onnx"), "ORT_ENABLE_ALL", "onnxruntime cannot load /no/such/"),
        (None, "ORT_ENABLE_EVERYTHING", "unknown graph optimisation level 'ORT_ENABLE_EVERYTHING'"),
    ],
)
def test_a_graph_that_cannot_be_opened_is_one_line(
    model: Path | bytes | None, level: str, expected: str
) -> None:
    with pytest.raises(GraphLoadError) as caught:
        open_session(add_one() if model is None else model, level=level)
    assert str(caught.value).startswith(expected)
    assert "\n" not in str(caught.value)


def test_fast_run_gives_what_run_gives() -> None:
    session = open_session(add_one())
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    run = fast_run(session)
    assert run == session._sess.run  # the binding underneath, past the wrapper's checks
    (fast,) = run(["y"], {"x": x}, None)
    (plain,) = session.run(["y"], {"x": x})
    assert np.array_equal(fast, plain)
    # onnxruntime's C++ side still checks the feed
    with pytest.raises(Exception, match=r"expected: \(tensor\(float\)\)"):
        run(["y"], {"x": x.astype(np.float64)}, None)
