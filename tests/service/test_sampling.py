"""The sampler draws from the distribution it claims to, row by row."""

from __future__ import annotations

import numpy as np
import pytest

from service.sampling import (
    RowParams,
    SamplingHead,
    SamplingParams,
    Uniforms,
    log_softmax,
    make_rng,
    sample_batch,
    sample_rows,
    top_ids,
)

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

HEAD_VOCAB = 400  # 20 blocks of 20 words: 8 get exact weights, 12 sit behind the envelope
HEAD_DRAWS = 40_000


def _head_logits(kind: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if kind == "frequency-sorted":  # like a trained model: earlier ids are likelier
        logits = -1.3 * np.log(np.arange(1, HEAD_VOCAB + 1)) + rng.standard_normal(HEAD_VOCAB)
    elif kind == "peaked":
        logits = rng.standard_normal(HEAD_VOCAB) * 0.5
        logits[rng.choice(HEAD_VOCAB, 5, replace=False)] += 6.0
    elif kind == "flat":  # like a random model
        logits = rng.standard_normal(HEAD_VOCAB) * 0.08
    else:  # "tail": one strong word per block, most mass outside the exact blocks
        logits = np.full(HEAD_VOCAB, -3.0) + rng.standard_normal(HEAD_VOCAB) * 0.1
        logits[::20] = 2.0
    return logits.astype(np.float32)


def _assert_follows(tokens: np.ndarray, p: np.ndarray) -> None:
    """Frequencies match p: words grouped by probability into bins of >= 2% mass, each
    within 5 standard deviations; words of probability 0 never drawn."""
    n = len(tokens)
    freq = np.bincount(tokens, minlength=len(p)) / n
    groups: list[list[int]] = [[]]
    for word in np.argsort(-p):
        groups[-1].append(int(word))
        if p[groups[-1]].sum() >= 0.02:
            groups.append([])
    for group in (g for g in groups if g):
        expected, got = p[group].sum(), freq[group].sum()
        sigma = np.sqrt(expected * (1 - expected) / n)
        assert abs(got - expected) <= 5 * sigma + 1e-4, (group[:5], expected, got)
    assert not freq[p == 0].any()


def _uniforms(count: int, offset: int = 0) -> list[Uniforms]:
    return [Uniforms(make_rng(offset + i)) for i in range(count)]


@pytest.mark.parametrize("kind", ["frequency-sorted", "peaked", "flat", "tail"])
@pytest.mark.parametrize("path", ["direct", "envelope"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_head_samples_softmax_of_logits_over_t(kind: str, path: str, temperature: float) -> None:
    logits = _head_logits(kind)
    head = SamplingHead(HEAD_VOCAB, small_batch=HEAD_DRAWS if path == "direct" else 0, seed=11)
    tokens = head.sample(
        np.tile(logits, (HEAD_DRAWS, 1)),
        np.full(HEAD_DRAWS, 1.0 / temperature, np.float32),
        _uniforms(HEAD_DRAWS),
    )
    _assert_follows(tokens, _softmax(logits.astype(np.float64), temperature))
    assert (head.trials > 0) == (path == "envelope")


def test_head_rows_that_fail_every_trial_are_sampled_directly_and_stay_exact() -> None:
    logits = _head_logits("tail")
    head = SamplingHead(HEAD_VOCAB, small_batch=0, max_trials=1, seed=12)
    tokens = head.sample(
        np.tile(logits, (HEAD_DRAWS, 1)), np.ones(HEAD_DRAWS, np.float32), _uniforms(HEAD_DRAWS)
    )
    assert head.fallbacks > HEAD_DRAWS // 10
    _assert_follows(tokens, _softmax(logits.astype(np.float64)))


def test_head_pads_a_vocabulary_that_blocks_do_not_divide() -> None:
    vocab = 397  # 20 blocks of 20, the last one 17 words long
    logits = _head_logits("frequency-sorted")[:vocab]
    for small_batch in (HEAD_DRAWS, 0):
        head = SamplingHead(vocab, small_batch=small_batch, seed=13)
        tokens = head.sample(
            np.tile(logits, (HEAD_DRAWS, 1)), np.ones(HEAD_DRAWS, np.float32), _uniforms(HEAD_DRAWS)
        )
        assert tokens.max() < vocab
        _assert_follows(tokens, _softmax(logits.astype(np.float64)))


def test_seeded_rows_sample_alike_alone_and_in_a_large_batch() -> None:
    head = SamplingHead(HEAD_VOCAB, small_batch=8)
    others = np.random.default_rng(9).standard_normal((63, HEAD_VOCAB)).astype(np.float32)
    mine = _head_logits("frequency-sorted")
    seeded = SamplingParams(seed=1234)
    for step in range(20):  # one seeded stream, 20 tokens, its generator shared across steps
        if step == 0:
            alone_rng, together_rng = Uniforms(make_rng(1234)), Uniforms(make_rng(1234))
        alone = sample_rows(mine[None, :].copy(), RowParams.of([seeded]), [alone_rng], head)
        batch = np.vstack([others[:17], mine[None, :], others[17:]])
        params = [SamplingParams()] * 17 + [seeded] + [SamplingParams()] * 46
        rngs = [*_uniforms(17, 100 * step), together_rng, *_uniforms(46, 100 * step + 50)]
        together = sample_rows(batch, RowParams.of(params), rngs, head)
        assert together[17] == alone[0]
    assert head.trials > 0  # the unseeded rows took the envelope


def test_uniforms_are_the_generators_own_numbers_in_order() -> None:
    stream, plain = Uniforms(make_rng(5), chunk=16), make_rng(5)
    assert [stream.random() for _ in range(50)] == [plain.random() for _ in range(50)]
