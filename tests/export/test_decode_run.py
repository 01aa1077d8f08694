"""export.graphs' decode_run: several decode steps in one graph, each sampled in it.

Its states are the model's stepped with the tokens it drew; its draws follow
softmax(logits * inv_t) without the row's ban, at either end of [0, 1) too; and the
export check refuses a graph that draws anything else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import export.graphs as graphs
from export.graphs import (
    RUN_STEPS,
    BuiltGraph,
    block_params,
    build_graphs,
    check_decode_run,
    checked,
    decode_run_graph,
)
from export.onnx_export import ExportError
from export.parity import random_state
from export.runtime import open_session
from simmer.bundle import DECODE_RUN, PREFILL, SAMPLING_DIRECT, SAMPLING_ENVELOPE, STEP_SOFTMAX
from training.model import RecipeLSTM

ROWS = 20_000  # rows of one call in the distribution test


def run_graph(tiny_onnx: Path, vocab: int, steps: int = RUN_STEPS) -> BuiltGraph:
    model = onnx.load(str(tiny_onnx))
    width = block_params(vocab)["width"]
    return checked(DECODE_RUN, decode_run_graph(model, vocab, width, steps), {"steps": steps})


def softmax(logits: np.ndarray, inv_t: np.ndarray, ban: np.ndarray) -> np.ndarray:
    scaled = (logits * inv_t).astype(np.float64)
    rows = np.flatnonzero(ban[:, 0] >= 0)
    scaled[rows, ban[rows, 0]] = -np.inf
    p: np.ndarray = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p


def test_each_steps_state_is_the_models_fed_the_token_drawn_before(
    tiny_onnx: Path, tiny_model: RecipeLSTM
) -> None:
    config = tiny_model.config
    run = open_session(run_graph(tiny_onnx, config.vocab_size).model)
    model = open_session(tiny_onnx)
    rng = np.random.default_rng(3)
    batch = 5
    tokens = rng.integers(2, config.vocab_size, (batch, 4))  # a 4-token first feed
    h, c = random_state(config, batch, rng)
    feeds = {
        "tokens": tokens,
        "h0": h,
        "c0": c,
        "inv_t": np.ones((batch, 1), np.float32),
        "ban": np.full((batch, 1), -1, np.int64),
        "uniforms": rng.random((batch, RUN_STEPS)),
    }
    sampled, hs, cs = run.run(["sampled", "hs", "cs"], feeds)
    assert sampled.shape == (batch, RUN_STEPS)
    feed = tokens
    for k in range(RUN_STEPS):
        _, h, c = model.run(None, {"tokens": feed, "h0": h, "c0": c})
        np.testing.assert_array_equal(hs[k], h)
        np.testing.assert_array_equal(cs[k], c)
        feed = sampled[:, k : k + 1]


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_draws_follow_the_softmax_and_never_the_banned_word(
    tiny_onnx: Path, tiny_model: RecipeLSTM, temperature: float
) -> None:
    """ROWS rows in one state: half ban the likeliest word. A chi-squared statistic over
    the 30 likeliest words and the rest stays far below what a wrong sampler gives."""
    config = tiny_model.config
    run = open_session(run_graph(tiny_onnx, config.vocab_size, steps=2).model)
    model = open_session(tiny_onnx)
    rng = np.random.default_rng(4)
    h, c = random_state(config, 1, rng)
    tokens = np.full((1, 1), 5, np.int64)
    logits = model.run(["logits"], {"tokens": tokens, "h0": h, "c0": c})[0]
    inv_t = np.full((1, 1), 1 / temperature, np.float32)
    top = int(np.argmax(logits))
    for ban in (-1, top):
        ban_col = np.full((ROWS, 1), ban, np.int64)
        feeds = {
            "tokens": np.repeat(tokens, ROWS, axis=0),
            "h0": np.repeat(h, ROWS, axis=1),
            "c0": np.repeat(c, ROWS, axis=1),
            "inv_t": np.repeat(inv_t, ROWS, axis=0),
            "ban": ban_col,
            "uniforms": rng.random((ROWS, 2)),
        }
        drawn = run.run(["sampled"], feeds)[0][:, 0]
        p = softmax(logits, inv_t, ban_col[:1])[0]
        counts = np.bincount(drawn, minlength=config.vocab_size)
        if ban >= 0:
            assert counts[ban] == 0
        assert (p[drawn] > 0).all()
        order = np.argsort(-p)
        observed = np.append(counts[order[:30]], counts[order[30:]].sum())
        expected = np.append(p[order[:30]], p[order[30:]].sum()) * ROWS
        chi2 = float(((observed - expected) ** 2 / np.maximum(expected, 1e-12)).sum())
        assert chi2 < 90, chi2  # 30 degrees of freedom: mean 30, sd 7.7


def test_the_ends_of_the_unit_interval_draw_words_of_positive_weight(
    tiny_onnx: Path, tiny_model: RecipeLSTM
) -> None:
    """u = 0 and the largest double below 1, at 1/T up to 1e4 where most weights are 0:
    a word of positive weight at the very start, or the very end, of the distribution."""
    config = tiny_model.config
    run = open_session(run_graph(tiny_onnx, config.vocab_size, steps=2).model)
    rng = np.random.default_rng(5)
    batch = 6
    h, c = random_state(config, batch, rng)
    inv_t = np.array([[1.0], [1.0], [30.0], [30.0], [1e4], [1e4]], np.float32)
    u = np.tile(np.array([[0.0], [1.0 - 2.0**-53]]), (3, 2))
    tokens = np.full((batch, 1), 7, np.int64)
    feeds = {"tokens": tokens, "h0": h, "c0": c, "inv_t": inv_t, "uniforms": u}
    feeds["ban"] = np.full((batch, 1), -1, np.int64)
    drawn = run.run(["sampled"], feeds)[0][:, 0]
    logits = open_session(tiny_onnx).run(["logits"], {"tokens": tokens, "h0": h, "c0": c})[0]
    p = softmax(logits, inv_t, feeds["ban"])
    r = np.arange(batch)
    assert (p[r, drawn] > 0).all()
    before = np.cumsum(p, axis=1)[r, drawn] - p[r, drawn]
    after = before + p[r, drawn]
    np.testing.assert_array_less(before[u[:, 0] == 0.0], 1e-6)
    np.testing.assert_array_less(1 - 1e-6, after[u[:, 0] > 0.5])


def test_the_export_check_refuses_a_run_that_draws_elsewhere(
    tiny_onnx: Path, tiny_model: RecipeLSTM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graph that always takes the likeliest word has the right states and shapes, but
    its words are not where the numbers fall."""

    def likeliest(b: graphs._Nodes, vocab: int, width: int, weights: str, *rest: str) -> None:
        b.add("ArgMax", [weights], [rest[-1]], axis=1, keepdims=1)

    monkeypatch.setattr(graphs, "_pick_nodes", likeliest)
    greedy = run_graph(tiny_onnx, tiny_model.config.vocab_size)
    with pytest.raises(ExportError, match=r"decode_run step \d sampled a word whose interval"):
        check_decode_run(greedy, tiny_onnx, tiny_model.config)


def test_the_export_check_passes_the_graph_it_builds(
    tiny_onnx: Path, tiny_model: RecipeLSTM
) -> None:
    built = build_graphs(tiny_onnx, tiny_model.config.vocab_size)[DECODE_RUN]
    assert built.params["steps"] == RUN_STEPS
    assert check_decode_run(built, tiny_onnx, tiny_model.config) <= graphs.GRAPH_TOL


def test_a_model_before_opset_16_gets_every_graph_but_decode_run(
    tiny_onnx: Path, tiny_model: RecipeLSTM, tmp_path: Path
) -> None:
    model = onnx.load(str(tiny_onnx))
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 15
    older = tmp_path / "opset15.onnx"
    onnx.save(model, str(older))
    built = build_graphs(older, tiny_model.config.vocab_size)
    assert set(built) == {STEP_SOFTMAX, SAMPLING_DIRECT, SAMPLING_ENVELOPE, PREFILL}
    with pytest.raises(ExportError, match="decode_run needs opset 16 or later"):
        decode_run_graph(model, tiny_model.config.vocab_size, 3, RUN_STEPS)


def test_a_run_of_one_step_is_refused(tiny_onnx: Path) -> None:
    with pytest.raises(ExportError, match="at least 2 steps"):
        decode_run_graph(onnx.load(str(tiny_onnx)), 500, 23, 1)


def test_a_model_decode_run_cannot_be_built_for_still_exports_the_other_graphs(
    tiny_onnx: Path, tiny_model: RecipeLSTM, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """decode_run is optional: a model whose state sizes are not fixed gets the others,
    and the export says why in one line."""
    model = onnx.load(str(tiny_onnx))
    for value in model.graph.input:
        if value.name in ("h0", "c0"):
            value.type.tensor_type.shape.dim[2].dim_param = "hidden"
    odd = tmp_path / "symbolic.onnx"
    onnx.save(model, str(odd))
    built = build_graphs(odd, tiny_model.config.vocab_size)
    assert set(built) == {STEP_SOFTMAX, SAMPLING_DIRECT, SAMPLING_ENVELOPE, PREFILL}
    assert capsys.readouterr().err == (
        "export: decode_run skipped: decode_run needs the model's layers and hidden size "
        "as fixed sizes\n"
    )
