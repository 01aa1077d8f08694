"""The scheduler steps every waiting session in one engine call."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from service.engine import Engine, StepOutput
from service.sampling import SamplingParams
from service.scheduler import DecodeScheduler, Sequence
from simmer.bundle import load_bundle


class CountingEngine(Engine):
    """The real engine, recording the shape of every call."""

    calls: list[tuple[int, int]]

    def run(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> StepOutput:
        if hasattr(self, "calls"):
            self.calls.append(tokens.shape)
        return super().run(tokens, h, c)


@pytest.fixture
def engine(tiny_bundle: Path) -> CountingEngine:
    eng = CountingEngine(load_bundle(tiny_bundle), ["CPUExecutionProvider"])
    eng.calls = []
    return eng


def _seq(engine: Engine, feed: list[int], max_new: int) -> Sequence:
    h, c = engine.zero_state(1)
    return Sequence(
        feed=feed,
        h=h[:, 0],
        c=c[:, 0],
        params=SamplingParams(temperature=0.0),
        max_new_tokens=max_new,
    )


async def _run_all(scheduler: DecodeScheduler, seqs: list[Sequence]) -> None:
    for seq in seqs:
        scheduler.submit(seq)
    for seq in seqs:
        while not seq.done:
            await seq.event.wait()
            seq.event.clear()


def test_many_sessions_share_each_decode_step(engine: CountingEngine) -> None:
    async def main() -> None:
        scheduler = DecodeScheduler(engine, max_batch=64)
        scheduler.start()
        seqs = [_seq(engine, [2 + i % 7], max_new=10) for i in range(40)]
        await _run_all(scheduler, seqs)
        await scheduler.close()
        assert all(len(s.tokens) == 10 or s.finish_reason == "eos" for s in seqs)

    asyncio.run(main())
    batched = [shape for shape in engine.calls if shape[0] == 40]
    assert batched, f"no engine call held all 40 sessions: {engine.calls}"
    assert all(shape[1] == 1 for shape in batched)
    # 40 sessions x 10 tokens in about 10 calls, not 400
    assert len(engine.calls) <= 12


def test_prompt_is_prefilled_in_one_call(engine: CountingEngine) -> None:
    prompt = list(range(2, 32))

    async def main() -> None:
        scheduler = DecodeScheduler(engine, max_batch=8)
        scheduler.start()
        await _run_all(scheduler, [_seq(engine, prompt, max_new=3)])
        await scheduler.close()

    asyncio.run(main())
    assert engine.calls[0] == (1, len(prompt))
    assert all(shape == (1, 1) for shape in engine.calls[1:])


def test_batched_results_equal_sessions_run_alone(engine: CountingEngine) -> None:
    feeds = [[3, 4, 5], [6], [7, 8], [9, 10, 11, 12]]

    async def generate(together: bool) -> list[list[int]]:
        scheduler = DecodeScheduler(engine, max_batch=8)
        scheduler.start()
        seqs = [_seq(engine, f, max_new=8) for f in feeds]
        if together:
            await _run_all(scheduler, seqs)
        else:
            for seq in seqs:
                await _run_all(scheduler, [seq])
        await scheduler.close()
        return [s.tokens for s in seqs]

    assert asyncio.run(generate(True)) == asyncio.run(generate(False))


def test_sessions_join_and_leave_between_steps(engine: CountingEngine) -> None:
    async def main() -> tuple[Sequence, Sequence]:
        scheduler = DecodeScheduler(engine, max_batch=8)
        scheduler.start()
        long = scheduler.submit(_seq(engine, [5], max_new=30))
        await long.event.wait()
        short = scheduler.submit(_seq(engine, [6], max_new=3))
        for seq in (long, short):
            while not seq.done:
                seq.event.clear()
                await seq.event.wait()
        await scheduler.close()
        return long, short

    _, short = asyncio.run(main())
    assert len(short.tokens) <= 3
    sizes = [shape[0] for shape in engine.calls]
    assert 2 in sizes and sizes[-1] == 1  # the short one joined, then left


def test_cancel_stops_within_one_step(engine: CountingEngine) -> None:
    async def main() -> Sequence:
        scheduler = DecodeScheduler(engine, max_batch=8)
        scheduler.start()
        seq = scheduler.submit(_seq(engine, [5], max_new=1000))
        await seq.event.wait()
        seq.cancel()
        produced = len(seq.tokens)
        while not seq.done:
            seq.event.clear()
            await seq.event.wait()
        await scheduler.close()
        assert len(seq.tokens) <= produced + 1
        return seq

    seq = asyncio.run(main())
    assert seq.finish_reason == "cancelled"
    assert len(seq.tokens) < 1000
