"""Continuous batching: every sequence waiting for its next token, in one engine call.

Each running sequence owns a slot in preallocated state arrays (layers, slots,
hidden). A step gathers the slots of every active sequence, runs the engine once per
distinct feed length (decode steps all have length 1, so they share one call; a new
prompt is prefilled in one call over its tokens), samples the whole batch at once, and
scatters the new state back. The engine and the sampler run in one worker thread, so
the event loop keeps streaming while they compute; the next batch forms as soon as the
last one returns, and sequences join and leave between steps.

Nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.engine import Engine
from service.sampling import SamplingParams, log_softmax, make_rng, sample_batch, top_ids
from simmer.tokenizer import PAD_ID

logger = logging.getLogger(__name__)


class SchedulerClosed(RuntimeError):
    """The scheduler is shutting down and takes no new work."""


@dataclass(eq=False)  # identity, not field-wise (numpy) comparison
class Sequence:
    """One generation in flight. The scheduler appends to `tokens` and sets `event`."""

    feed: list[int]  # tokens to feed at the next step
    h: np.ndarray  # (L, H) initial state
    c: np.ndarray
    params: SamplingParams
    max_new_tokens: int
    check: Callable[[int], str | None] | None = None  # per new token: a finish reason, or None
    tokens: list[int] = field(default_factory=list)  # generated so far
    top: list[TopLogprobs] = field(default_factory=list)  # per generated token, when asked
    steps_run: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    stop_reason: str | None = None  # set by the scheduler's owner to end it at the next step
    event: asyncio.Event = field(default_factory=asyncio.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    slot: int = -1
    seq_id: int = 0

    def __post_init__(self) -> None:
        self.rng = make_rng(self.params.seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(frozen=True)
class TopLogprobs:
    """The distribution one token was drawn from: its log-probability and the top words."""

    logprob: float
    ids: np.ndarray
    logprobs: np.ndarray


@dataclass
class StepStats:
    batch_size: int
    seconds: float


StepHook = Callable[[StepStats], None]
QueueHook = Callable[[float], None]


@dataclass
class _StepResult:
    tokens: np.ndarray
    top: dict[int, TopLogprobs]
    seconds: float


class DecodeScheduler:
    def __init__(
        self,
        engine: Engine,
        max_batch: int = 256,
        on_step: StepHook | None = None,
        on_admit: QueueHook | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.on_step = on_step
        self.on_admit = on_admit
        layers, hidden = engine.num_layers, engine.hidden_size
        self._h = np.zeros((layers, max_batch, hidden), np.float32)
        self._c = np.zeros((layers, max_batch, hidden), np.float32)
        self._free = list(range(max_batch - 1, -1, -1))
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="simmer-engine")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._ids = itertools.count(1)
        self.steps = 0
        self.engine_calls = 0

    # --- public API -----------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="simmer-scheduler")

    def submit(self, seq: Sequence) -> Sequence:
        if self._closed:
            raise SchedulerClosed("the scheduler is shutting down")
        if not seq.feed:
            raise ValueError("a sequence needs at least one token to feed")
        seq.seq_id = next(self._ids)
        seq.enqueued_at = time.perf_counter()
        self._waiting.append(seq)
        self._wakeup.set()
        return seq

    async def close(self) -> None:
        self._closed = True
        for seq in [*self._waiting, *self._running]:
            self._finish(seq, "shutdown")
        self._waiting.clear()
        self._running.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    def finish_all(self, reason: str) -> int:
        """End every waiting and running sequence now (at a step boundary for running ones)."""
        ended = 0
        for seq in [*self._waiting, *self._running]:
            if not seq.done:
                seq.stop_reason = reason
                ended += 1
        self._wakeup.set()
        return ended

    # --- the loop -------------------------------------------------------------------

    def _admit(self) -> None:
        if any(s.cancelled or s.stop_reason for s in self._waiting):
            keep: deque[Sequence] = deque()
            for seq in self._waiting:
                if seq.cancelled or seq.stop_reason:
                    self._finish(seq, seq.stop_reason or "cancelled")
                else:
                    keep.append(seq)
            self._waiting = keep
        while self._waiting and self._free:
            seq = self._waiting.popleft()
            seq.slot = self._free.pop()
            self._h[:, seq.slot] = seq.h
            self._c[:, seq.slot] = seq.c
            seq.started_at = time.perf_counter()
            if self.on_admit is not None:
                self.on_admit(seq.started_at - seq.enqueued_at)
            self._running.append(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finish_reason is None:
            seq.finish_reason = reason
        if seq.slot >= 0:
            seq.h = self._h[:, seq.slot].copy()
            seq.c = self._c[:, seq.slot].copy()
            self._free.append(seq.slot)
            seq.slot = -1
        seq.event.set()

    async def _supervise(self) -> None:
        """Run the loop; a bug in it ends the sequences in flight, never the server."""
        while True:
            try:
                await self._loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("scheduler loop failed; ending every sequence in flight")
                for seq in [*self._waiting, *self._running]:
                    self._finish(seq, "error")
                self._waiting.clear()
                self._running.clear()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._admit()
            for seq in [s for s in self._running if s.cancelled or s.stop_reason]:
                self._finish(seq, seq.stop_reason or "cancelled")
            self._running = [s for s in self._running if not s.done]
            if not self._running:
                self._wakeup.clear()
                if not self._waiting:
                    await self._wakeup.wait()
                continue
            batch = list(self._running)
            try:
                result = await loop.run_in_executor(self._executor, self._step, batch)
            except Exception:
                logger.exception("engine step failed; ending %d sequences", len(batch))
                for seq in batch:
                    self._finish(seq, "error")
                continue
            self.steps += 1
            if self.on_step is not None:
                self.on_step(StepStats(len(batch), result.seconds))
            for row, seq in enumerate(batch):
                if seq.done:
                    continue
                seq.steps_run += 1
                token = int(result.tokens[row])
                if token == PAD_ID:
                    seq.feed = []
                    self._finish(seq, "eos")
                    continue
                if row in result.top:
                    seq.top.append(result.top[row])
                seq.tokens.append(token)
                seq.feed = [token]
                reason = seq.check(token) if seq.check is not None else None
                if reason is not None:
                    self._finish(seq, reason)
                elif seq.cancelled:
                    self._finish(seq, "cancelled")
                elif len(seq.tokens) >= seq.max_new_tokens:
                    self._finish(seq, "length")
                else:
                    seq.event.set()

    def _step(self, batch: list[Sequence]) -> _StepResult:
        """Worker thread: feed every sequence, sample every row. Touches only slot arrays."""
        started = time.perf_counter()
        vocab = self.engine.vocab_size
        logits = np.empty((len(batch), vocab), np.float32)
        by_length: dict[int, list[int]] = {}
        for row, seq in enumerate(batch):
            by_length.setdefault(len(seq.feed), []).append(row)
        for length, rows in by_length.items():
            slots = np.array([batch[r].slot for r in rows])
            tokens = np.array([batch[r].feed for r in rows], dtype=np.int64).reshape(
                len(rows), length
            )
            out = self.engine.run(
                tokens,
                np.ascontiguousarray(self._h[:, slots]),
                np.ascontiguousarray(self._c[:, slots]),
            )
            self.engine_calls += 1
            self._h[:, slots] = out.h
            self._c[:, slots] = out.c
            if len(rows) == len(batch):
                logits = out.logits
            else:
                logits[rows] = out.logits
        no_eos = [row for row, seq in enumerate(batch) if seq.params.ignore_eos]
        if no_eos:
            logits[no_eos, PAD_ID] = -np.inf
        wanted = [row for row, seq in enumerate(batch) if seq.params.logprobs]
        rows_logp = {row: log_softmax(logits[row], batch[row].params.temperature) for row in wanted}
        tokens = sample_batch(logits, [s.params for s in batch], [s.rng for s in batch])
        top: dict[int, TopLogprobs] = {}
        for row in wanted:
            logp = rows_logp[row]
            ids = top_ids(logp, batch[row].params.logprobs)
            top[row] = TopLogprobs(float(logp[tokens[row]]), ids, logp[ids])
        return _StepResult(tokens, top, time.perf_counter() - started)
