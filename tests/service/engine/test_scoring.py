"""The scorer gives what the decode path would: each next token's logprob and the top-k words
equal the log_softmax of model.onnx stepped one token at a time, it ends in the state
feeding the tokens leaves, chunk boundaries change nothing, and a bundle without the
scoring graph has no scorer."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.engine.model import ModelSession
from service.engine.scoring import Scorer, Scores
from simmer.bundle import GRAPHS, MANIFEST, SEQUENCE_LOGPROBS, ModelBundle, load_bundle

TOL = 1e-5
LENGTH = 37


@pytest.fixture(scope="module")
def engine(model_bundle: ModelBundle) -> ModelSession:
    return ModelSession(model_bundle, ["CPUExecutionProvider"], 1)


@pytest.fixture(scope="module")
def scorer(model_bundle: ModelBundle) -> Scorer:
    scorer = Scorer.from_bundle(model_bundle)
    assert scorer is not None
    return scorer


def chunked(model_bundle: ModelBundle, chunk: int) -> Scorer:
    scorer = Scorer.from_bundle(model_bundle, chunk=chunk)
    assert scorer is not None
    return scorer


def state_for(engine: ModelSession, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (engine.num_layers, engine.hidden_size)
    return (
        np.tanh(rng.standard_normal(shape)).astype(np.float32),
        (rng.standard_normal(shape) * 2).astype(np.float32),
    )


def stepped(
    engine: ModelSession, h: np.ndarray, c: np.ndarray, tokens: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The decode path: model.onnx fed one token at a time. log_softmax of the logits
    after each position (n, V) in float64, and the final state (L, H)."""
    rows = []
    hh, cc = h[:, None, :], c[:, None, :]
    for token in tokens:
        out = engine.run(np.array([[token]], np.int64), hh, cc)
        hh, cc = out.h, out.c
        x = out.logits[0].astype(np.float64)
        x -= x.max()
        rows.append(x - np.log(np.exp(x).sum()))
    return np.array(rows), hh[:, 0], cc[:, 0]


def tokens_for(engine: ModelSession, length: int = LENGTH, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed + 1)
    return [int(t) for t in rng.integers(0, engine.vocab_size, length)]


def test_each_next_tokens_logprob_is_the_stepped_main_graphs_log_softmax(
    scorer: Scorer, engine: ModelSession
) -> None:
    h, c = state_for(engine)
    tokens = tokens_for(engine)
    want, _, _ = stepped(engine, h, c, tokens)
    got = scorer.score(h, c, tokens)
    assert got.next_logprobs.shape == (LENGTH - 1,)
    expected = want[np.arange(LENGTH - 1), tokens[1:]]
    np.testing.assert_allclose(got.next_logprobs, expected, rtol=0, atol=TOL)


def test_top_k_are_the_likeliest_words_after_each_position_likeliest_first(
    scorer: Scorer, engine: ModelSession
) -> None:
    h, c = state_for(engine, 1)
    tokens = tokens_for(engine, seed=1)
    want, _, _ = stepped(engine, h, c, tokens)
    k = 5
    got = scorer.score(h, c, tokens, top_k=k)
    assert got.top_ids.shape == got.top_logprobs.shape == (LENGTH, k)  # the last position too
    rows = np.arange(LENGTH)[:, None]
    np.testing.assert_allclose(got.top_logprobs, want[rows, got.top_ids], rtol=0, atol=TOL)
    assert np.all(np.diff(got.top_logprobs, axis=1) <= 0)
    for row, ids in enumerate(got.top_ids):
        assert len(set(ids.tolist())) == k
        rest = np.delete(want[row], ids)
        assert rest.max() <= want[row, ids].min() + TOL
        assert list(ids) == list(np.argsort(-want[row], kind="stable")[:k])


def test_the_state_after_scoring_is_the_state_after_feeding_the_tokens(
    scorer: Scorer, engine: ModelSession
) -> None:
    h, c = state_for(engine, 2)
    tokens = tokens_for(engine, seed=2)
    _, step_h, step_c = stepped(engine, h, c, tokens)
    whole = engine.run(np.array([tokens], np.int64), h[:, None], c[:, None])  # one prefill
    got = scorer.score(h, c, tokens)
    assert got.h.shape == got.c.shape == (engine.num_layers, engine.hidden_size)
    for want_h, want_c in ((step_h, step_c), (whole.h[:, 0], whole.c[:, 0])):
        np.testing.assert_allclose(got.h, want_h, rtol=0, atol=TOL)
        np.testing.assert_allclose(got.c, want_c, rtol=0, atol=TOL)


@pytest.mark.parametrize("chunk", [1, 2, 5, LENGTH - 1, LENGTH, 512])
def test_chunk_boundaries_are_invisible(
    model_bundle: ModelBundle, scorer: Scorer, engine: ModelSession, chunk: int
) -> None:
    h, c = state_for(engine, 3)
    tokens = tokens_for(engine, seed=3)
    whole = scorer.score(h, c, tokens, top_k=3)
    cut = chunked(model_bundle, chunk).score(h, c, tokens, top_k=3)
    np.testing.assert_allclose(cut.next_logprobs, whole.next_logprobs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cut.top_logprobs, whole.top_logprobs, rtol=0, atol=1e-6)
    assert np.array_equal(cut.top_ids, whole.top_ids)
    np.testing.assert_allclose(cut.h, whole.h, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cut.c, whole.c, rtol=0, atol=1e-6)


def test_scoring_a_text_in_two_calls_carrying_the_state_is_one_call(
    scorer: Scorer, engine: ModelSession
) -> None:
    """The first call's last position holds the distribution of the second call's first
    token: its logprob is the one the text's single call gives."""
    h, c = state_for(engine, 4)
    tokens = tokens_for(engine, seed=4)
    whole = scorer.score(h, c, tokens)
    first = scorer.score(h, c, tokens[:10], top_k=engine.vocab_size)
    second = scorer.score(first.h, first.c, tokens[10:])
    at_cut = first.top_logprobs[-1][list(first.top_ids[-1]).index(tokens[10])]
    joined = np.concatenate([first.next_logprobs, [at_cut], second.next_logprobs])
    np.testing.assert_allclose(joined, whole.next_logprobs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(second.h, whole.h, rtol=0, atol=1e-6)
    np.testing.assert_allclose(second.c, whole.c, rtol=0, atol=1e-6)


def test_no_tokens_score_nothing_and_keep_the_state(scorer: Scorer, engine: ModelSession) -> None:
    h, c = state_for(engine, 5)
    got = scorer.score(h, c, [], top_k=3)
    assert got.next_logprobs.shape == (0,)
    assert got.top_ids.shape == got.top_logprobs.shape == (0, 3)
    assert np.array_equal(got.h, h) and np.array_equal(got.c, c)
    one = scorer.score(h, c, [7], top_k=0)
    assert one.next_logprobs.shape == (0,) and one.top_ids.shape == (1, 0)


def test_a_top_k_past_the_vocabulary_ranks_every_word(scorer: Scorer, engine: ModelSession) -> None:
    h, c = state_for(engine, 6)
    got = scorer.score(h, c, [3, 4], top_k=2**31 - 1)
    assert got.top_ids.shape == (2, engine.vocab_size)
    assert all(sorted(row) == list(range(engine.vocab_size)) for row in got.top_ids.tolist())
    np.testing.assert_allclose(
        np.exp(got.top_logprobs.astype(np.float64)).sum(axis=1), 1, atol=1e-4
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("negative token", "token -1 is outside the vocabulary"),
        ("token past the vocabulary", "is outside the vocabulary of"),
        ("token past int64", "is outside the vocabulary of"),
        ("batched h", "h has shape [L, 1, H]"),
        ("two-layer c", "c has shape [2, H]"),
        ("negative top_k", "top_k must be at least 0"),
    ],
)
def test_a_bad_input_is_refused_with_one_line(
    scorer: Scorer, engine: ModelSession, change: str, message: str
) -> None:
    h, c = state_for(engine)
    layers, hidden = engine.num_layers, engine.hidden_size
    cases: dict[str, dict[str, Any]] = {
        "negative token": {"tokens": [1, -1]},
        "token past the vocabulary": {"tokens": [engine.vocab_size]},
        "token past int64": {"tokens": [2**64]},
        "batched h": {"h": np.zeros((layers, 1, hidden), np.float32)},
        "two-layer c": {"c": np.zeros((2, hidden), np.float32)},
        "negative top_k": {"top_k": -1},
    }
    call = cases[change]
    arguments: dict[str, Any] = {"h": h, "c": c, "tokens": [1, 2], "top_k": 1, **call}
    expected = message.replace("L", str(layers)).replace("H", str(hidden))
    with pytest.raises(ValueError, match=re.escape(expected)) as caught:
        scorer.score(**arguments)
    assert "\n" not in str(caught.value)


def test_scores_from_worker_threads_are_the_scores_of_one_call_at_a_time(
    scorer: Scorer, engine: ModelSession
) -> None:
    inputs = [(*state_for(engine, seed), tokens_for(engine, 20 + seed, seed)) for seed in range(6)]
    alone = [scorer.score(h, c, tokens, top_k=2) for h, c, tokens in inputs]

    async def together() -> list[Scores]:
        calls = [asyncio.to_thread(scorer.score, h, c, t, top_k=2) for h, c, t in inputs]
        return list(await asyncio.gather(*calls))

    for got, want in zip(asyncio.run(together()), alone, strict=True):
        assert np.array_equal(got.next_logprobs, want.next_logprobs)
        assert np.array_equal(got.top_ids, want.top_ids)
        assert np.array_equal(got.h, want.h)


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 10**9), max_size=40),
    top_k=st.one_of(st.integers(0, 8), st.integers(0, 2**63 - 1)),
    chunk=st.integers(1, 50),
)
def test_every_token_list_top_k_and_chunk_gives_scores_of_the_right_shape(
    scorer: Scorer, tokens: list[int], top_k: int, chunk: int
) -> None:
    vocab = scorer.vocab_size
    cut = Scorer(scorer.session, vocab, scorer.num_layers, scorer.hidden_size, chunk)
    ids = [t % vocab for t in tokens]
    h, c = cut.zero_state()
    got = cut.score(h, c, ids, top_k=top_k)
    k = min(top_k, vocab)
    assert got.next_logprobs.shape == (max(len(ids) - 1, 0),)
    assert got.top_ids.shape == got.top_logprobs.shape == (len(ids), k)
    assert np.all(np.isfinite(got.next_logprobs)) and np.all(got.next_logprobs <= 1e-6)
    assert np.all((got.top_ids >= 0) & (got.top_ids < vocab))


def test_a_bundle_without_the_scoring_graph_has_no_scorer_and_still_decodes(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    older = tmp_path / "older"
    shutil.copytree(tiny_bundle, older)
    manifest = json.loads((older / MANIFEST).read_text())
    del manifest[GRAPHS][SEQUENCE_LOGPROBS]
    (older / MANIFEST).write_text(json.dumps(manifest))
    (older / f"{SEQUENCE_LOGPROBS}.onnx").unlink()
    loaded = load_bundle(older)
    assert loaded.graph(SEQUENCE_LOGPROBS) is None
    assert Scorer.from_bundle(loaded) is None
    engine = ModelSession(loaded, ["CPUExecutionProvider"], 1)
    assert engine.run(np.ones((1, 3), np.int64), *engine.zero_state(1)).logits.shape == (
        1,
        loaded.vocab_size,
    )


def test_the_token_after_the_text_is_scored_without_being_fed(tiny_bundle: Path) -> None:
    scorer = Scorer.from_bundle(load_bundle(tiny_bundle), chunk=3)
    assert scorer is not None
    h, c = scorer.zero_state()
    whole = scorer.score(h, c, [5, 6, 7, 8, 9, 10, 11])
    head = scorer.score(h, c, [5, 6, 7, 8, 9, 10], then=11)
    assert len(head.next_logprobs) == 6
    np.testing.assert_allclose(head.next_logprobs, whole.next_logprobs, atol=1e-6)
    assert np.array_equal(head.h, scorer.score(h, c, [5, 6, 7, 8, 9, 10]).h)  # 11 not fed
    assert scorer.score(h, c, [], then=5).next_logprobs.shape == (0,)
