"""logit_bias, bans and penalties: the arithmetic on a known row, and the runner's paths."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.engine.adjust import SlotAdjustments
from service.engine.core import build_engine
from service.engine.model import ModelOutput, ModelSession, SoftmaxOutput
from service.engine.params import BAN, SamplingParams, Uniforms, make_rng
from service.engine.request import Request
from service.engine.runner import ModelRunner, _Rows
from service.engine.sampler import RowParams, log_softmax, sample_batch, sample_rows
from simmer.bundle import block_width, load_bundle
from simmer.tokenizer import UNK_ID

VOCAB = 10
ROW = np.arange(VOCAB, dtype=np.float32) * 0.5  # word 9 is the most likely


def _batch(params: SamplingParams, slot: int = 2, slots: int = 4) -> SlotAdjustments:
    adjust = SlotAdjustments(slots, VOCAB)
    adjust.load(slot, params)
    return adjust


def test_a_bias_is_added_to_its_words_logit_and_minus_100_bans_the_word() -> None:
    adjust = _batch(SamplingParams(logit_bias=((3, 5.0), (7, BAN), (8, -99.5))))
    batch = adjust.batch(np.array([2, 0]), np.zeros(2, bool))
    assert batch is not None
    logits = np.stack([ROW, ROW])
    batch.apply(logits)
    want = ROW.copy()
    want[3] += 5.0
    want[8] -= 99.5
    want[7] = -np.inf
    np.testing.assert_array_equal(logits[0], want)
    np.testing.assert_array_equal(logits[1], ROW)  # slot 0 has no changes
    assert batch.unfused.tolist() == [0]  # row 0 has a finite bias: off the fused softmax


def test_bans_alone_keep_a_row_on_the_fused_softmax_unless_it_has_a_seed() -> None:
    adjust = _batch(SamplingParams(logit_bias=((UNK_ID, BAN),)))
    batch = adjust.batch(np.array([2]), np.zeros(1, bool))
    assert batch is not None and batch.unfused.tolist() == [] and batch.fused.tolist() == [0]
    assert batch.redrawn(np.array([UNK_ID])).tolist() == [0]  # a draw of the ban: again
    assert batch.redrawn(np.array([5])).tolist() == []
    seeded = adjust.batch(np.array([2, 0]), np.array([True, True]))
    assert seeded is not None and seeded.unfused.tolist() == [0]
    assert seeded.redrawn(np.array([UNK_ID, UNK_ID])).tolist() == []
    assert adjust.batch(np.array([0, 1]), np.zeros(2, bool)) is None


def test_penalties_subtract_frequency_times_count_plus_presence_once() -> None:
    adjust = _batch(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    batch = adjust.batch(np.array([2]), np.zeros(1, bool))
    assert batch is not None
    for token in (4, 4, 6, 4):
        batch.count(np.array([token]))
    logits = ROW[None].copy()
    batch.apply(logits)
    counts = np.zeros(VOCAB, np.float32)
    counts[4], counts[6] = 3, 1
    np.testing.assert_allclose(logits[0], ROW - 0.25 * counts - 0.5 * (counts > 0))
    assert logits[0, 4] == pytest.approx(ROW[4] - 0.75 - 0.5)


def test_negative_penalties_favour_the_words_already_generated() -> None:
    adjust = _batch(SamplingParams(presence_penalty=-2.0, frequency_penalty=-2.0))
    batch = adjust.batch(np.array([2]), np.zeros(1, bool))
    assert batch is not None
    batch.count(np.array([1]))
    logits = ROW[None].copy()
    batch.apply(logits)
    assert logits[0, 1] == pytest.approx(ROW[1] + 4.0)


def test_counts_start_from_zero_when_a_slot_is_reused() -> None:
    params = SamplingParams(frequency_penalty=1.0)
    adjust = _batch(params)
    batch = adjust.batch(np.array([2]), np.zeros(1, bool))
    assert batch is not None
    batch.count(np.array([5]))
    adjust.load(2, params)  # the next request in slot 2
    logits = ROW[None].copy()
    again = adjust.batch(np.array([2]), np.zeros(1, bool))
    assert again is not None
    again.apply(logits)
    np.testing.assert_array_equal(logits[0], ROW)


def test_a_banned_word_is_never_drawn_not_even_greedily() -> None:
    bans = SamplingParams(logit_bias=((9, BAN), (8, BAN)))
    for params in (
        SamplingParams(temperature=0.0, logit_bias=bans.logit_bias),
        SamplingParams(temperature=5.0, logit_bias=bans.logit_bias),
        SamplingParams(temperature=5.0, top_k=3, logit_bias=bans.logit_bias),
    ):
        adjust = SlotAdjustments(1, VOCAB)
        adjust.load(0, params)
        batch = adjust.batch(np.array([0]), np.zeros(1, bool))
        assert batch is not None
        draws = 2000
        row = ROW[None].copy()
        batch.apply(row)
        logits = np.tile(row, (draws, 1))
        tokens = sample_batch(logits, [params] * draws, [make_rng(i) for i in range(draws)])
        assert not np.isin(tokens, [8, 9]).any()
        if params.greedy:
            assert set(tokens.tolist()) == {7}


def _fused_rows(params: SamplingParams, n: int) -> tuple[SoftmaxOutput, np.ndarray, _Rows]:
    """`n` rows of ROW as a fused step gives them, its changed logits and its row arrays."""
    width = block_width(VOCAB)
    blocks = -(-VOCAB // width)
    probs = np.zeros((n, blocks * width), np.float32)
    probs[:, :VOCAB] = np.exp(ROW - ROW.max()) / np.exp(ROW - ROW.max()).sum()
    sums = probs.reshape(n, blocks, width).sum(axis=2)
    logits = np.tile(ROW, (n, 1))
    empty = np.zeros((1, n, 1), np.float32)
    adjust = SlotAdjustments(n, VOCAB)
    for slot in range(n):
        adjust.load(slot, params)
    seeded = np.full(n, params.seed is not None)
    batch = adjust.batch(np.arange(n), seeded)
    assert batch is not None
    batch.apply(logits)
    shared = Uniforms(make_rng(0))
    rngs = [shared if params.seed is None else Uniforms(make_rng(i)) for i in range(n)]
    rows = _Rows(np.arange(n), RowParams.of([params] * n), [], [], rngs, batch)
    return SoftmaxOutput(logits.copy(), empty, empty, probs, sums), logits, rows


@pytest.mark.parametrize("seed", [None, 1])
def test_a_fused_step_samples_a_banned_row_from_its_changed_distribution(
    model: PathModel, seed: int | None
) -> None:
    # word 9 holds 39% of ROW's mass: a draw of it is drawn again from the banned logits
    params = SamplingParams(seed=seed, logit_bias=((9, BAN),))
    fused, logits, rows = _fused_rows(params, 30_000)
    tokens = ModelRunner(model, 1, None)._pick_fused(fused, logits, rows)
    assert 9 not in tokens.tolist()
    want = np.exp(ROW[:9] - ROW[:9].max())
    want /= want.sum()
    got = np.bincount(tokens, minlength=VOCAB)[:9] / len(tokens)
    assert np.abs(got - want).max() < 0.012
    if seed is not None:  # seeded rows draw as they would unfused: the same numbers
        _, again, unfused = _fused_rows(params, 30_000)
        np.testing.assert_array_equal(tokens, sample_rows(again, unfused.params, unfused.rngs))


# --- the runner, on the tiny bundle --------------------------------------------------------


class PathModel(ModelSession):
    """The real model session, recording which call each step made."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.paths: list[str] = []  # the base class's own checks run the model too
        super().__init__(*args, **kwargs)

    def run(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> ModelOutput:
        self.paths.append("run")
        return super().run(tokens, h, c)

    def run_state(
        self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        self.paths.append("state")
        return super().run_state(tokens, h, c)

    def run_softmax(
        self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray, inv_t: np.ndarray
    ) -> SoftmaxOutput:
        self.paths.append("fused")
        return super().run_softmax(tokens, h, c, inv_t)


@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> PathModel:
    return PathModel(load_bundle(tiny_bundle), ["CPUExecutionProvider"])


def _generate(
    model: PathModel, params: list[SamplingParams], max_new: int = 30, fuse: bool = True
) -> list[Request]:
    """One batch of requests from the same prompt, run to the end."""

    async def main() -> list[Request]:
        engine = build_engine(model, 8, fuse_sampling=fuse)
        engine.start()
        h, c = model.zero_state(1)
        requests = [
            Request(feed=[3, 4], h=h[:, 0], c=c[:, 0], params=p, max_new_tokens=max_new)
            for p in params
        ]
        for request in requests:
            engine.submit(request)
        for request in requests:
            while not request.done:
                await request.event.wait()
                request.event.clear()
        await engine.close()
        return requests

    model.paths = []
    return asyncio.run(main())


def test_plain_and_ban_only_requests_keep_the_fused_step(model: PathModel) -> None:
    for params in (SamplingParams(seed=1), SamplingParams(seed=1, logit_bias=((UNK_ID, BAN),))):
        (request,) = _generate(model, [params], max_new=40)
        # the prefill feeds the state alone; every decode step after it is fused
        assert model.paths[0] == "state" and set(model.paths[1:]) == {"fused"}, params
    assert UNK_ID not in request.tokens


def test_a_biased_neighbour_leaves_a_plain_request_its_fused_step_and_tokens(
    model: PathModel,
) -> None:
    plain = SamplingParams(seed=11)
    (alone,) = _generate(model, [plain])
    neighbour = SamplingParams(
        seed=12, logit_bias=((5, 3.0), (7, BAN)), presence_penalty=1.0, frequency_penalty=0.5
    )
    together, biased = _generate(model, [plain, neighbour])
    assert set(model.paths[1:]) == {"fused"}
    assert together.tokens == alone.tokens
    assert 7 not in biased.tokens
    # the biased row, resampled from its changed logits, draws what it draws unfused
    _, unfused = _generate(model, [plain, neighbour], fuse=False)
    assert "fused" not in model.paths
    assert unfused.tokens == biased.tokens


def test_a_greedy_request_never_takes_its_banned_argmax(model: PathModel) -> None:
    greedy = SamplingParams(temperature=0.0)
    (free,) = _generate(model, [greedy], max_new=5)
    first = free.tokens[0]
    (banned,) = _generate(model, [SamplingParams(temperature=0.0, logit_bias=((first, BAN),))])
    assert first not in banned.tokens


@pytest.mark.parametrize("seed", [None, 3])
def test_a_ban_that_takes_nearly_all_of_a_fused_softmax_still_samples_the_rest(
    model: PathModel, seed: int | None
) -> None:
    # at T = 1e-3 the fused float32 softmax gives the best word, [UNK] for the tiny model,
    # all the mass: the banned row must be drawn from its logits, not from zeros
    ban_unk = ((UNK_ID, BAN),)
    (cold,) = _generate(model, [SamplingParams(temperature=1e-3, seed=seed, logit_bias=ban_unk)])
    assert set(model.paths[1:]) == {"fused"}
    (greedy,) = _generate(model, [SamplingParams(temperature=0.0, logit_bias=ban_unk)])
    assert UNK_ID not in cold.tokens
    assert cold.tokens == greedy.tokens


def test_logprobs_are_those_of_the_biased_distribution(model: PathModel) -> None:
    params = SamplingParams(seed=5, logprobs=5, logit_bias=((42, 100.0), (UNK_ID, BAN)))
    (request,) = _generate(model, [params], max_new=10)
    assert request.tokens == [42] * 10
    for top in request.top:
        assert top.ids[0] == 42 and top.logprob > -1e-3
        assert UNK_ID not in top.ids.tolist()
        assert np.isfinite(top.logprobs).all()


def test_log_softmax_of_a_banned_row_ranks_the_banned_word_last() -> None:
    logits = ROW.copy()
    logits[9] = -np.inf
    logp = log_softmax(logits, 1.0)
    assert logp[9] == -np.inf and np.isfinite(logp[:9]).all()
