"""The sampler draws from the distribution it claims to, row by row."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.params import SamplingParams, Uniforms, make_rng
from service.engine.sampler import log_softmax, sample_batch, top_ids

VOCAB = 40
DRAWS = 30_000


def _logits(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(VOCAB) * 2).astype(np.float32)


def _softmax(x: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = np.exp((x - x.max()) / t)
    return z / z.sum()  # type: ignore[no-any-return]


def _frequencies(params: SamplingParams, logits: np.ndarray) -> np.ndarray:
    batch = np.tile(logits, (DRAWS, 1))
    tokens = sample_batch(batch, [params] * DRAWS, [make_rng(i) for i in range(DRAWS)])
    return np.bincount(tokens, minlength=VOCAB) / DRAWS


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_follows_softmax_of_logits_over_t(temperature: float) -> None:
    logits = _logits()
    expected = _softmax(logits, temperature)
    assert (
        np.abs(_frequencies(SamplingParams(temperature=temperature), logits) - expected).max()
        < 0.012
    )


def test_top_k_keeps_only_the_k_most_likely_renormalised() -> None:
    logits = _logits(1)
    p = _softmax(logits)
    keep = np.argsort(-p)[:5]
    expected = np.zeros(VOCAB)
    expected[keep] = p[keep] / p[keep].sum()
    freq = _frequencies(SamplingParams(top_k=5), logits)
    assert set(np.flatnonzero(freq)) <= set(keep)
    assert np.abs(freq - expected).max() < 0.012


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = _logits(2)
    p = _softmax(logits)
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    keep = order[before < 0.6]
    expected = np.zeros(VOCAB)
    expected[keep] = p[keep] / p[keep].sum()
    freq = _frequencies(SamplingParams(top_p=0.6), logits)
    assert set(np.flatnonzero(freq)) <= set(keep)
    assert np.abs(freq - expected).max() < 0.012


def test_top_p_wider_than_the_candidate_set_still_exact() -> None:
    vocab = 2000
    logits = np.zeros(vocab, np.float32)  # flat: the nucleus at 0.9 holds 1800 words
    tokens = sample_batch(
        np.tile(logits, (4000, 1)),
        [SamplingParams(top_p=0.9)] * 4000,
        [make_rng(i) for i in range(4000)],
    )
    assert len(np.unique(tokens)) > 1000


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0), SamplingParams(top_k=1)])
def test_greedy_is_argmax(params: SamplingParams) -> None:
    logits = np.random.default_rng(3).standard_normal((16, VOCAB)).astype(np.float32)
    expected = logits.argmax(axis=1)
    tokens = sample_batch(logits.copy(), [params] * 16, [make_rng(i) for i in range(16)])
    assert (tokens == expected).all()


def test_same_seed_same_tokens_whatever_shares_the_batch() -> None:
    logits = np.random.default_rng(4).standard_normal((8, VOCAB)).astype(np.float32)
    seeded = SamplingParams(seed=123)
    mixed = [
        seeded,
        SamplingParams(top_k=3),
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=0.5),
    ]
    alone = [sample_batch(logits[:1].copy(), [seeded], [make_rng(123)])[0] for _ in range(1)]
    rngs = [make_rng(123), make_rng(None), make_rng(None), make_rng(None)]
    together = sample_batch(np.vstack([logits[:1]] * 4).copy(), mixed, rngs)
    assert together[0] == alone[0]


def test_rows_in_one_batch_follow_their_own_params() -> None:
    logits = np.tile(_logits(5), (3, 1))
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=2), SamplingParams()]
    for seed in range(50):
        tokens = sample_batch(logits.copy(), params, [make_rng(seed + i) for i in range(3)])
        assert tokens[0] == logits[0].argmax()
        assert tokens[1] in set(np.argsort(-logits[1])[:2])


def test_log_softmax_and_top_ids_rank_the_distribution() -> None:
    logits = _logits(6)
    logp = log_softmax(logits, 0.7)
    assert np.isclose(np.exp(logp).sum(), 1.0)
    ids = top_ids(logp, 5)
    assert list(ids) == list(np.argsort(-logits)[:5])


# --- the onnxruntime sampling head -------------------------------------------------------


def test_uniforms_are_the_generators_own_numbers_in_order() -> None:
    stream, plain = Uniforms(make_rng(5), chunk=16), make_rng(5)
    assert [stream.random() for _ in range(50)] == [plain.random() for _ in range(50)]
