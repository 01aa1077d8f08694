"""The engine core steps every waiting session in one model call, and survives faults."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from service.engine.core import PIPELINE_DEPTH, EngineCore, EngineDown, build_engine
from service.engine.model import ModelOutput, ModelSession, SoftmaxOutput
from service.engine.output import Hooks
from service.engine.params import SamplingParams
from service.engine.request import Request
from service.engine.runner import ModelRunner
from simmer.bundle import load_bundle


class CountingModel(ModelSession):
    """The real model session, recording the shape of every call."""

    calls: list[tuple[int, int]]

    def run(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> ModelOutput:
        if hasattr(self, "calls"):
            self.calls.append(tokens.shape)
        return super().run(tokens, h, c)

    def run_state(
        self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if hasattr(self, "calls"):
            self.calls.append(tokens.shape)
        return super().run_state(tokens, h, c)

    def run_softmax(
        self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray, inv_t: np.ndarray
    ) -> SoftmaxOutput:
        if hasattr(self, "calls"):
            self.calls.append(tokens.shape)
        return super().run_softmax(tokens, h, c, inv_t)


@pytest.fixture
def engine(tiny_bundle: Path) -> CountingModel:
    eng = CountingModel(load_bundle(tiny_bundle), ["CPUExecutionProvider"])
    eng.calls = []
    return eng


def _seq(engine: ModelSession, feed: list[int], max_new: int) -> Request:
    h, c = engine.zero_state(1)
    return Request(
        feed=feed,
        h=h[:, 0],
        c=c[:, 0],
        params=SamplingParams(temperature=0.0),
        max_new_tokens=max_new,
    )


async def _run_all(scheduler: EngineCore, seqs: list[Request]) -> None:
    for seq in seqs:
        scheduler.submit(seq)
    await _wait_all(seqs)


async def _wait_all(seqs: list[Request]) -> None:
    for seq in seqs:
        while not seq.done:
            await seq.event.wait()
            seq.event.clear()


def test_many_sessions_share_each_decode_step(engine: CountingModel) -> None:
    async def main() -> None:
        scheduler = build_engine(engine, 64)
        seqs = [_seq(engine, [2 + i % 7], max_new=10) for i in range(40)]
        for seq in seqs:  # before the worker starts, so it takes all 40 at once
            scheduler.submit(seq)
        scheduler.start()
        await _wait_all(seqs)
        await scheduler.close()
        assert all(len(s.tokens) == 10 or s.finish_reason == "eos" for s in seqs)

    asyncio.run(main())
    batched = [shape for shape in engine.calls if shape[0] == 40]
    assert batched, f"no engine call held all 40 sessions: {engine.calls}"
    assert all(shape[1] == 1 for shape in batched)
    # 40 sessions x 10 tokens in about 10 calls, not 400
    assert len(engine.calls) <= 12


def test_prompt_is_prefilled_in_one_call(engine: CountingModel) -> None:
    prompt = list(range(2, 32))

    async def main() -> None:
        scheduler = build_engine(engine, 8)
        scheduler.start()
        await _run_all(scheduler, [_seq(engine, prompt, max_new=3)])
        await scheduler.close()

    asyncio.run(main())
    # all but the last prompt token in one call; the last one is the first decode step's
    assert engine.calls[0] == (1, len(prompt) - 1)
    assert engine.calls[1:] == [(1, 1)] * 3


def test_batched_results_equal_sessions_run_alone(engine: CountingModel) -> None:
    feeds = [[3, 4, 5], [6], [7, 8], [9, 10, 11, 12]]

    async def generate(together: bool) -> list[list[int]]:
        scheduler = build_engine(engine, 8)
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


def test_sessions_join_and_leave_between_steps(engine: CountingModel) -> None:
    async def main() -> tuple[Request, Request]:
        scheduler = build_engine(engine, 8)
        scheduler.start()
        # long enough that it is still running when the short one arrives, however far
        # ahead of the loop the worker got (PIPELINE_DEPTH steps at most, twice over)
        long = scheduler.submit(_seq(engine, [5], max_new=200))
        await long.event.wait()
        short = scheduler.submit(_seq(engine, [6], max_new=3))
        await _run_all(scheduler, [])
        while not (long.done and short.done):  # noqa: ASYNC110 - either may finish first
            await asyncio.sleep(0.001)
        await scheduler.close()
        return long, short

    _, short = asyncio.run(main())
    assert len(short.tokens) <= 3
    sizes = [shape[0] for shape in engine.calls]
    assert 2 in sizes  # the short one joined,
    assert sizes[-1] == 1  # then left


def test_cancel_stops_within_one_step(engine: CountingModel) -> None:
    async def main() -> Request:
        scheduler = build_engine(engine, 8)
        scheduler.start()
        seq = scheduler.submit(_seq(engine, [5], max_new=1000))
        await seq.event.wait()
        scheduler.cancel(seq)
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


def test_a_stop_decided_by_the_loop_keeps_the_state_of_the_kept_tokens(
    engine: CountingModel,
) -> None:
    prompt = [3, 4, 5]

    async def main() -> Request:
        scheduler = build_engine(engine, 32)
        scheduler.start()
        # busy batch-mates, so the worker is stepping ahead of the loop when it stops
        others = [scheduler.submit(_seq(engine, [6 + i], max_new=200)) for i in range(20)]
        seq = _seq(engine, prompt, max_new=100)
        seq.check = lambda token: "stop" if len(seq.tokens) == 5 else None
        await _run_all(scheduler, [seq])
        for other in others:
            scheduler.cancel(other)
        await _run_all(scheduler, others)
        await scheduler.close()
        return seq

    seq = asyncio.run(main())
    assert seq.finish_reason == "stop"
    assert len(seq.tokens) == 5
    assert seq.steps_run == 5
    assert seq.feed == [seq.tokens[-1]]  # the last kept token is pending, not fed
    h, c = engine.zero_state(1)
    fed = engine.run(np.array([prompt + seq.tokens[:-1]], np.int64), h, c)
    assert np.allclose(seq.h, fed.h[:, 0], atol=1e-5)
    assert np.allclose(seq.c, fed.c[:, 0], atol=1e-5)


def test_consumers_wake_every_stride_tokens_and_keep_every_token(engine: CountingModel) -> None:
    async def main() -> list[list[int]]:
        scheduler = build_engine(engine, 8)
        output = scheduler.output
        output.stride_for = lambda batch, worker_cpu: 4  # type: ignore[method-assign]  # a busy loop
        seqs = [_seq(engine, [5], max_new=10) for _ in range(3)]
        h = np.zeros((engine.num_layers, 3, engine.hidden_size), np.float32)
        wakes: list[list[int]] = [[] for _ in seqs]
        for _ in range(10):
            output.apply(seqs, [7] * 3, h, h, {}, 0.0)
            for seq, woken in zip(seqs, wakes, strict=True):
                if seq.event.is_set():
                    woken.append(len(seq.tokens))
                    seq.event.clear()
        assert all(seq.tokens == [7] * 10 for seq in seqs)
        assert all(seq.finish_reason == "length" for seq in seqs)
        return wakes

    assert asyncio.run(main()) == [[1, 5, 9, 10]] * 3


def test_coalescing_starts_only_for_large_batches_on_a_busy_loop(engine: CountingModel) -> None:
    scheduler = build_engine(engine, 64, max_stride=4)

    def step(batch: int, loop_cpu: float, worker_cpu: float) -> int:
        scheduler.output._loop_cpu_at = time.thread_time() - loop_cpu
        return scheduler.output.stride_for(batch, worker_cpu)

    assert max(step(1, 0.01, 0.001) for _ in range(100)) == 1  # one stream: every token at once
    assert [step(64, 0.01, 0.001) for _ in range(100)][-1] == 4  # busy loop: up to max_stride
    assert [step(64, 0.0, 0.01) for _ in range(100)][-1] == 1  # idle loop: back to every token


def _block_the_loop(scheduler: EngineCore, steps: int) -> int:
    """Hold the event loop (so nothing is applied) until the worker has run `steps`."""
    start = scheduler.runner.calls
    deadline = time.monotonic() + 30
    while scheduler.runner.calls < start + steps and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.2)  # time to run further, had it no bound
    return scheduler.runner.calls - start


def test_the_worker_runs_ahead_of_a_blocked_loop_by_at_most_the_pipeline_depth(
    engine: CountingModel,
) -> None:
    async def main() -> int:
        scheduler = build_engine(engine, 8)
        scheduler.start()
        seq = scheduler.submit(_seq(engine, [5], max_new=1000))
        await seq.event.wait()
        ran = _block_the_loop(scheduler, 3)
        scheduler.cancel(seq)
        await _run_all(scheduler, [])
        while not seq.done:
            seq.event.clear()
            await seq.event.wait()
        await scheduler.close()
        return ran

    ran = asyncio.run(main())
    assert ran >= 3
    assert ran <= PIPELINE_DEPTH + 2


def test_sampling_fused_into_the_engine_call_draws_the_same_tokens(engine: CountingModel) -> None:
    def generate(fuse: bool) -> list[int]:
        async def main() -> list[int]:
            scheduler = build_engine(engine, 8, fuse_sampling=fuse)
            scheduler.start()
            h, c = engine.zero_state(1)
            seq = Request(
                feed=[3, 4], h=h[:, 0], c=c[:, 0], params=SamplingParams(seed=7), max_new_tokens=30
            )
            await _run_all(scheduler, [seq])
            await scheduler.close()
            return seq.tokens

        return asyncio.run(main())

    engine.calls = []
    fused = generate(True)
    # the prompt's first token alone (state only), then one call per token sampled
    assert len(engine.calls) == 1 + len(fused)
    assert fused == generate(False)


class FailingModel(CountingModel):
    """The real engine, raising on the calls whose numbers are in `fail_on`."""

    fail_on: set[int]
    kill_on: set[int]

    def _inject(self, tokens: np.ndarray) -> None:
        number = len(getattr(self, "calls", ()))
        if number in getattr(self, "kill_on", ()):
            raise SystemExit("the worker thread is killed")  # not an Exception: it escapes
        if number in getattr(self, "fail_on", ()):
            self.calls.append(tokens.shape)
            raise RuntimeError("injected engine fault")

    def run(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> ModelOutput:
        self._inject(tokens)
        return super().run(tokens, h, c)

    def run_state(
        self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        self._inject(tokens)
        return super().run_state(tokens, h, c)


@pytest.fixture
def failing(tiny_bundle: Path) -> FailingModel:
    eng = FailingModel(load_bundle(tiny_bundle), ["CPUExecutionProvider"])
    eng.calls, eng.fail_on, eng.kill_on = [], set(), set()
    return eng


def test_an_engine_fault_fails_only_the_sequences_of_that_step(failing: FailingModel) -> None:
    failures: list[None] = []

    async def main() -> tuple[list[Request], list[Request]]:
        hooks = Hooks(on_failure=lambda: failures.append(None))
        scheduler = build_engine(failing, 8, hooks, fuse_sampling=False)
        scheduler.start()
        failing.fail_on = {3}  # the prefill (calls 0 and 1, one per feed length) and one step
        first = [_seq(failing, [5, 6], 50), _seq(failing, [7], 50)]
        await _run_all(scheduler, first)
        later = [_seq(failing, [5, 6], 4)]
        await _run_all(scheduler, later)
        assert scheduler.worker_alive
        await scheduler.close()
        return first, later

    first, later = asyncio.run(main())
    assert [seq.finish_reason for seq in first] == ["error", "error"]
    assert all(len(seq.tokens) == 2 for seq in first)  # the steps before the fault
    assert later[0].finish_reason == "length" and len(later[0].tokens) == 4
    assert failures == [None]


def test_a_sequence_that_cannot_be_admitted_fails_alone(
    engine: CountingModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_slot = ModelRunner.load
    failures: list[None] = []

    def refuse_long_feeds(self: ModelRunner, slot: int, seq: Request) -> None:
        if len(seq.feed) > 2:
            raise OverflowError("cannot fit")
        load_slot(self, slot, seq)

    monkeypatch.setattr(ModelRunner, "load", refuse_long_feeds)

    async def main() -> list[Request]:
        hooks = Hooks(on_failure=lambda: failures.append(None))
        scheduler = build_engine(engine, 4, hooks)
        scheduler.start()
        seqs = [_seq(engine, [5, 6, 7], 3), _seq(engine, [5], 3), _seq(engine, [8, 9], 3)]
        await _run_all(scheduler, seqs)
        free = scheduler.free_slots
        await scheduler.close()
        assert free == 4  # the refused sequence's slot was given back
        return seqs

    refused, *served = asyncio.run(main())
    assert refused.finish_reason == "error" and refused.tokens == []
    assert [seq.finish_reason for seq in served] == ["length", "length"]
    assert failures == [None]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_worker_fails_its_work_refuses_more_and_shows_as_stalled(
    failing: FailingModel,
) -> None:
    async def main() -> tuple[list[Request], bool, float]:
        scheduler = build_engine(failing, 4, fuse_sampling=False)
        scheduler.start()
        failing.kill_on = {3}
        seqs = [_seq(failing, [5], 100), _seq(failing, [6, 7], 100)]
        for seq in seqs:
            scheduler.submit(seq)
        assert scheduler._thread is not None
        await asyncio.to_thread(scheduler._thread.join, 30)
        alive = scheduler.worker_alive
        stalled = scheduler.stalled_for()
        watchdog = asyncio.create_task(scheduler.watch_worker(0.01))
        for seq in seqs:
            while not seq.done:
                await asyncio.wait_for(seq.event.wait(), 30)
                seq.event.clear()
        watchdog.cancel()
        with pytest.raises(EngineDown):
            scheduler.submit(_seq(failing, [5], 1))
        await scheduler.close()
        return seqs, alive, stalled

    seqs, alive, stalled = asyncio.run(main())
    assert not alive
    assert stalled > 0  # work waits on a worker that will never step again
    assert [seq.finish_reason for seq in seqs] == ["error", "error"]


def test_a_request_the_loop_stops_frees_its_slot_within_the_pipeline_depth(
    engine: CountingModel,
) -> None:
    async def main() -> tuple[Request, int]:
        scheduler = build_engine(engine, 8)
        scheduler.start()
        request = _seq(engine, [5], 200)
        request.check = lambda token: "stop"  # a stop string at the first token
        await _run_all(scheduler, [request])
        while scheduler.num_running:  # noqa: ASYNC110 - the worker reports its counts
            await asyncio.sleep(0.001)
        free = scheduler.free_slots
        await scheduler.close()
        return request, free

    engine.calls = []
    request, free = asyncio.run(main())
    assert request.finish_reason == "stop" and len(request.tokens) == 1
    assert free == 8
    # the worker may have run ahead by the pipeline depth, never to max_new_tokens
    assert len(engine.calls) <= PIPELINE_DEPTH + 3
