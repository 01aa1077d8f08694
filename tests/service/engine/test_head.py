"""The sampling head (the bundle's sampling graphs in onnxruntime, then numpy) draws
exactly from softmax(logits / T), directly and through the envelope."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.params import SamplingParams, Uniforms, make_rng
from service.engine.sampler import RowParams, sample_rows
from tests.service.engine.graphs import sampling_head
from tests.service.engine.test_sampler import _softmax

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
    head = sampling_head(HEAD_VOCAB, small_batch=HEAD_DRAWS if path == "direct" else 0, seed=11)
    tokens = head.sample(
        np.tile(logits, (HEAD_DRAWS, 1)),
        np.full(HEAD_DRAWS, 1.0 / temperature, np.float32),
        _uniforms(HEAD_DRAWS),
    )
    _assert_follows(tokens, _softmax(logits.astype(np.float64), temperature))
    assert (head.trials > 0) == (path == "envelope")


def test_head_rows_that_fail_every_trial_are_sampled_directly_and_stay_exact() -> None:
    logits = _head_logits("tail")
    head = sampling_head(HEAD_VOCAB, small_batch=0, max_trials=1, seed=12)
    tokens = head.sample(
        np.tile(logits, (HEAD_DRAWS, 1)), np.ones(HEAD_DRAWS, np.float32), _uniforms(HEAD_DRAWS)
    )
    assert head.fallbacks > HEAD_DRAWS // 10
    _assert_follows(tokens, _softmax(logits.astype(np.float64)))


def test_head_pads_a_vocabulary_that_blocks_do_not_divide() -> None:
    vocab = 397  # 20 blocks of 20, the last one 17 words long
    logits = _head_logits("frequency-sorted")[:vocab]
    for small_batch in (HEAD_DRAWS, 0):
        head = sampling_head(vocab, small_batch=small_batch, seed=13)
        tokens = head.sample(
            np.tile(logits, (HEAD_DRAWS, 1)), np.ones(HEAD_DRAWS, np.float32), _uniforms(HEAD_DRAWS)
        )
        assert tokens.max() < vocab
        _assert_follows(tokens, _softmax(logits.astype(np.float64)))


def test_seeded_rows_sample_alike_alone_and_in_a_large_batch() -> None:
    head = sampling_head(HEAD_VOCAB, small_batch=8)
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
