"""Continuous batching: every sequence waiting for its next token, in one engine call.

A worker thread owns the engine. Each running sequence owns a slot in preallocated
state arrays (layers, slots, hidden). A step runs the engine once per distinct feed
length (decode steps all have length 1, so they share one call; a new prompt is
prefilled in one call over its tokens) and samples the whole batch at once. While the
batch stays the same, each step feeds the previous step's state and tokens straight
back in; the slot arrays are written only when sequences join or leave.

The worker does not wait for the event loop between steps. It hands each step's tokens
to the loop (`call_soon_threadsafe`) and goes straight on to the next step, so the loop
streams step N while the engine computes step N + 1. The loop applies the tokens to
their sequences: stop strings, cancellation and waking consumers happen there. The
worker may run up to `PIPELINE_DEPTH` steps ahead of what the loop has applied, so a
busy or descheduled loop does not stall the engine; a sequence the loop stops (a stop
string, a cancel) may therefore be stepped a few more times, and those tokens are
dropped. A sequence keeps the state of the last step whose token it kept, plus that
token as its pending feed, so its session is exactly what the kept tokens imply.

Under load, waking every stream's consumer for every token costs the loop more than
the tokens are worth: see `DecodeScheduler._coalesce`.

Nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.engine import Engine
from service.sampling import (
    SMALL_BATCH,
    RowParams,
    SamplingHead,
    SamplingParams,
    Uniforms,
    log_softmax,
    make_rng,
    pick_weighted,
    sample_rows,
    top_ids,
)
from simmer.tokenizer import PAD_ID

logger = logging.getLogger(__name__)

PIPELINE_DEPTH = 16  # steps the worker may run ahead of the event loop
# coalescing under load (see DecodeScheduler._coalesce)
COALESCE_MIN_BATCH = 8  # smaller batches always stream every token at once
COALESCE_HIGH = 0.25  # the loop's CPU per step, as a share of the engine thread's
COALESCE_LOW = 0.1
COALESCE_EVERY = 4  # steps between stride adjustments (doubling or halving)


class SchedulerClosed(RuntimeError):
    """The scheduler is shutting down and takes no new work."""


class EngineDown(SchedulerClosed):
    """The engine worker has died: nothing more can be generated in this process."""


@dataclass(eq=False)  # a sequence is equal only to itself
class Sequence:
    """One generation in flight. The scheduler appends to `tokens` and sets `event`."""

    feed: list[int]  # tokens to feed at the next step; once done, the pending token
    h: np.ndarray  # (L, H) initial state; the final state once done
    c: np.ndarray
    params: SamplingParams
    max_new_tokens: int
    check: Callable[[int], str | None] | None = None  # per new token: a finish reason, or None
    tokens: list[int] = field(default_factory=list)  # generated so far
    top: list[TopLogprobs] = field(default_factory=list)  # per generated token, when asked
    steps_run: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    stop_reason: str | None = None  # the finish reason a stop() asked for
    detached: bool = False  # nobody waits for the result any more (its client left)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    slot: int = -1
    seq_id: int = 0
    # loop side: the state after the last applied step, as (h, c, row) of that step
    _state: tuple[np.ndarray, np.ndarray, int] | None = field(default=None, repr=False)
    # worker side: tokens sampled so far, applied or not
    _sampled: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        # a seed gets its own generator; without one the scheduler's shared one (a fresh
        # generator from OS entropy costs ~25 us, a request's worth of loop time)
        seed = self.params.seed
        self.rng: Uniforms | None = None if seed is None else Uniforms(make_rng(seed))

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        self.cancelled = True

    def stop(self, reason: str) -> None:
        """End it at the next step boundary with `reason` as its finish reason."""
        self.stop_reason = reason
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
    """What the worker hands the loop after a step, or with nothing but news."""

    batch: list[Sequence]
    tokens: np.ndarray  # (B,) int64
    h: np.ndarray | None  # (L, B, H): each row's state after the step; never written again
    c: np.ndarray | None
    top: dict[int, TopLogprobs]
    seconds: float  # wall time of the step
    admitted: list[float] = field(default_factory=list)  # queue times of new sequences
    dropped: list[Sequence] = field(default_factory=list)  # cancelled before or between steps
    failed: bool = False  # the step raised: every sequence in `batch` ends with "error"
    refused: list[Sequence] = field(default_factory=list)  # could not be admitted: "error"
    cpu: float = 0.0  # the worker thread's CPU seconds since its previous result


@dataclass
class _Batch:
    """The running batch as arrays, and the state its last step left (until it changes)."""

    slots: np.ndarray  # (B,) int64
    rows: RowParams
    logprobs: list[int]  # rows that report top words
    no_eos: list[int]  # rows that never draw the stop token
    rngs: list[Uniforms]  # each row's generator (rows without a seed share one)
    carry: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (tokens (B, 1), h, c)


class DecodeScheduler:
    def __init__(
        self,
        engine: Engine,
        max_batch: int = 256,
        on_step: StepHook | None = None,
        on_admit: QueueHook | None = None,
        max_stride: int = 16,
        fuse_sampling: bool = True,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.on_step = on_step
        self.on_admit = on_admit
        self.on_failure = on_failure  # once per failed step or refused admission (loop side)
        self.max_stride = max_stride
        layers, hidden = engine.num_layers, engine.hidden_size
        self._h = np.zeros((layers, max_batch, hidden), np.float32)
        self._c = np.zeros((layers, max_batch, hidden), np.float32)
        self._next = np.zeros(max_batch, np.int64)  # each slot's next token to feed
        # each slot's sampling parameters, gathered into a RowParams per batch
        self._inv_t = np.ones(max_batch, np.float32)
        self._top_k = np.zeros(max_batch, np.int64)
        self._top_p = np.ones(max_batch, np.float64)
        self._greedy = np.zeros(max_batch, bool)
        self._seeded = np.zeros(max_batch, bool)
        self._logprobs = np.zeros(max_batch, bool)
        self._no_eos = np.zeros(max_batch, bool)
        self._free = list(range(max_batch - 1, -1, -1))
        self._inbox: deque[Sequence] = deque()  # submitted, not yet seen by the worker
        # worker-owned:
        self._waiting: deque[Sequence] = deque()  # seen, no slot yet
        self._running: list[Sequence] = []
        self._batch: _Batch | None = None  # None when the running set changed
        self._fresh = 0  # running sequences whose prompt is not fed yet
        self._unseeded = Uniforms(make_rng(None))  # every row without a seed draws here
        self._head = _make_head(engine)
        self._fuse = fuse_sampling and self._head is not None and engine.enable_weights()
        # between the threads:
        self._work = threading.Event()  # set when the worker may have something to do
        self._in_flight = threading.Semaphore(PIPELINE_DEPTH)  # results not yet applied
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._down: str | None = None  # why the worker is gone, once the loop has seen it
        self._progress_at = time.monotonic()  # the worker's last sign of life (see stalled_for)
        self._cpu_at = 0.0  # the worker thread's CPU time at its previous result
        # loop-owned: coalescing
        self._stride = 1
        self._loop_share = 0.0
        self._loop_cpu_at = 0.0
        self._until_adjust = COALESCE_EVERY
        self._ids = itertools.count(1)
        self.steps = 0
        self.engine_calls = 0

    # --- public API -----------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._inbox) + len(self._waiting)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def stride(self) -> int:
        """Tokens per consumer wake-up right now (1 unless the loop is busy)."""
        return self._stride

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_cpu_at = time.thread_time()
        self._thread = threading.Thread(target=self._work_loop, name="simmer-engine", daemon=True)
        self._thread.start()

    def submit(self, seq: Sequence) -> Sequence:
        if self._down is not None:
            raise EngineDown(self._down)
        if self._closed:
            raise SchedulerClosed("the scheduler is shutting down")
        if not seq.feed:
            raise ValueError("a sequence needs at least one token to feed")
        seq.seq_id = next(self._ids)
        seq.enqueued_at = time.perf_counter()
        self._inbox.append(seq)
        self._work.set()
        return seq

    async def close(self, join_timeout_s: float = 10.0) -> None:
        """Stop the worker and end what it held with "shutdown". A worker hung inside a
        step is left behind after `join_timeout_s` (it is a daemon thread)."""
        self._closed = True
        self._work.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, join_timeout_s)
        for seq in [*self._inbox, *self._waiting, *self._running]:
            self._finish(seq, "shutdown")
        self._inbox.clear()
        self._waiting.clear()
        self._running.clear()

    # --- health (read on the event loop) -------------------------------------------

    @property
    def worker_alive(self) -> bool:
        """False once the worker thread has ended without being asked to."""
        return self._thread is None or self._closed or self._thread.is_alive()

    def stalled_for(self) -> float:
        """Seconds work has waited on a worker that made no step (0 while idle or moving).

        The worker marks each pass of its loop; a pass that waits for work marks it
        again when work arrives. A step that never returns, or a worker that died, leaves
        the mark behind while sequences wait.
        """
        if not (self._inbox or self._waiting or self._running):
            return 0.0
        return max(0.0, time.monotonic() - self._progress_at)

    async def watch_worker(self, interval_s: float) -> None:
        """Background task: once the worker has died, fail what it held (see `fail_all`)."""
        while True:
            await asyncio.sleep(interval_s)
            if not self.worker_alive and self._down is None:
                ended = self.fail_all("the engine worker died; this replica cannot generate")
                logger.critical("the engine worker died; ended %d generations", ended)
                if self.on_failure is not None:
                    self.on_failure()

    def fail_all(self, reason: str) -> int:
        """The worker is gone: end every sequence with "error" and take no new work.

        Call on the event loop once `worker_alive` is False. Returns how many ended.
        """
        self._down = reason
        pending = [*self._inbox, *self._waiting, *self._running]
        self._inbox.clear()
        self._waiting.clear()
        self._running.clear()
        for seq in pending:
            self._finish(seq, "error")
        return len(pending)

    # --- the event loop's side ------------------------------------------------------

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finish_reason is not None:
            return
        if seq._state is not None:
            # the state after the last applied step; its token is pending (unless eos)
            h, c, row = seq._state
            seq.h, seq.c = h[:, row].copy(), c[:, row].copy()
            seq.feed = [seq.tokens[-1]] if reason != "eos" and seq.tokens else []
            seq._state = None
        seq.finish_reason = reason
        seq.event.set()

    def _deliver(self, result: _StepResult) -> None:
        """Apply one step's tokens to their sequences (in the event loop)."""
        try:
            self._apply(result)
        finally:
            self._in_flight.release()

    def _apply(self, result: _StepResult) -> None:
        for seq in result.dropped:
            self._finish(seq, seq.stop_reason or "cancelled")
        for seq in result.refused:
            self._finish(seq, "error")
        if self.on_admit is not None:
            for waited in result.admitted:
                self.on_admit(waited)
        if self.on_failure is not None and (result.failed or result.refused):
            self.on_failure()
        if not result.batch:
            return
        if result.failed:
            for seq in result.batch:
                self._finish(seq, "error")
            return
        self.steps += 1
        if self.on_step is not None:
            self.on_step(StepStats(len(result.batch), result.seconds))
        stride = self._coalesce(len(result.batch), result.cpu)
        tokens = result.tokens.tolist()
        top = result.top
        h, c = result.h, result.c
        assert h is not None
        assert c is not None
        for row, seq in enumerate(result.batch):
            if seq.finish_reason is not None:
                continue  # stopped by the loop after the worker took this step
            seq.steps_run += 1
            seq._state = (h, c, row)
            token = tokens[row]
            if token == PAD_ID:
                self._finish(seq, "eos")
                continue
            if top and row in top:
                seq.top.append(top[row])
            seq.tokens.append(token)
            reason = seq.check(token) if seq.check is not None else None
            if reason is not None:
                self._finish(seq, reason)
            elif seq.cancelled:
                self._finish(seq, seq.stop_reason or "cancelled")
            elif len(seq.tokens) >= seq.max_new_tokens:
                self._finish(seq, "length")
            elif stride == 1 or len(seq.tokens) % stride == 1:
                seq.event.set()  # else its consumer is woken with the next tokens

    def _coalesce(self, batch: int, worker_cpu: float) -> int:
        """The stride for this step: wake each stream's consumer every `stride` tokens.

        Every token is sent as soon as it is sampled while the event loop keeps up
        easily. When the loop's CPU time per step (applying tokens, waking consumers,
        encoding and writing messages) passes `COALESCE_HIGH` of the engine thread's,
        the stride doubles, so that one message carries several tokens; it halves
        again below `COALESCE_LOW`. Batches under `COALESCE_MIN_BATCH` always get
        every token at once; the first token, the last and any stop always go out at
        once too.
        """
        now = time.thread_time()
        loop_cpu, self._loop_cpu_at = now - self._loop_cpu_at, now
        if batch < COALESCE_MIN_BATCH or self.max_stride <= 1:
            self._stride = 1
            return 1
        share = min(loop_cpu / max(worker_cpu, 1e-6), 4.0)
        self._loop_share += 0.3 * (share - self._loop_share)
        self._until_adjust -= 1
        if self._until_adjust <= 0:
            self._until_adjust = COALESCE_EVERY
            if self._loop_share > COALESCE_HIGH:
                self._stride = min(self._stride * 2, self.max_stride)
            elif self._loop_share < COALESCE_LOW:
                self._stride = max(self._stride // 2, 1)
        return self._stride

    # --- the worker thread ----------------------------------------------------------

    def _post(self, result: _StepResult) -> bool:
        """Hand a result to the loop, waiting while PIPELINE_DEPTH are unapplied."""
        self._in_flight.acquire()
        loop = self._loop
        try:
            assert loop is not None
            loop.call_soon_threadsafe(self._deliver, result)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._in_flight.release()
            return False
        return True

    def _work_loop(self) -> None:
        """The worker thread: admit, step, hand the result over; forever, whatever fails.

        An exception in a step fails the sequences of that step (and only those); one
        while admitting a sequence fails that sequence; anything else fails the running
        batch. Either way the worker goes on with the next step.
        """
        self._cpu_at = time.thread_time()
        while not self._closed:
            self._progress_at = time.monotonic()
            try:
                if not self._work_pass():
                    return
            except Exception:
                logger.exception("engine worker fault; ending %d sequences", len(self._running))
                if not self._post(self._failed(list(self._running))):
                    return
            except BaseException:
                logger.critical("the engine worker is dying", exc_info=True)
                raise

    def _work_pass(self) -> bool:
        """One pass of the worker's loop; False once the event loop is gone."""
        admitted, dropped, refused = self._admit()
        if not self._running:
            posted = True
            if dropped or refused:
                posted = self._post(self._news(admitted, dropped, refused))
            self._work.clear()
            if not (self._inbox or self._closed):
                self._work.wait()
            return posted
        batch = list(self._running)
        try:
            result = self._step(batch)
        except Exception:
            logger.exception("engine step failed; ending %d sequences", len(batch))
            result = self._failed(batch)
        result.admitted, result.dropped, result.refused = admitted, dropped, refused
        now = time.thread_time()
        result.cpu, self._cpu_at = now - self._cpu_at, now
        return self._post(result)

    def _failed(self, batch: list[Sequence]) -> _StepResult:
        """The result of a step that raised: `batch` ends with "error", slots are freed."""
        self._reset()
        result = self._news([], [], [])
        result.batch, result.failed = batch, True
        return result

    @staticmethod
    def _news(
        admitted: list[float], dropped: list[Sequence], refused: list[Sequence]
    ) -> _StepResult:
        """A result with no step in it, only sequences that joined, left or failed."""
        empty = np.zeros(0, np.int64)
        return _StepResult([], empty, None, None, {}, 0.0, admitted, dropped, refused=refused)

    def _reset(self) -> None:
        """After a failed step: every running sequence gives its slot back (worker thread).

        The carried state of the failed step is not trusted, so it is not written back.
        """
        self._batch = None
        for seq in self._running:
            if seq.slot >= 0:
                self._free.append(seq.slot)
                seq.slot = -1
        self._running.clear()
        self._fresh = 0

    def _admit(self) -> tuple[list[float], list[Sequence], list[Sequence]]:
        """Drop stopped sequences, take new ones into free slots (worker thread).

        Returns the new sequences' queue times, the sequences dropped (cancelled) and
        those refused (their parameters could not be set up: they end with "error").
        """
        dropped: list[Sequence] = []
        refused: list[Sequence] = []
        for seq in [s for s in self._running if s.cancelled or s.finish_reason is not None]:
            self._retire(seq)
            if seq.finish_reason is None:
                dropped.append(seq)
        while self._inbox:
            self._waiting.append(self._inbox.popleft())
        admitted: list[float] = []
        while self._waiting and self._free:
            seq = self._waiting.popleft()
            if seq.cancelled:
                dropped.append(seq)
                continue
            self._unbatch()
            slot = self._free.pop()
            try:
                self._load_slot(slot, seq)
            except Exception:
                logger.exception("cannot admit sequence %d; ending it", seq.seq_id)
                self._free.append(slot)
                refused.append(seq)
                continue
            seq.slot = slot
            seq._sampled = 0
            self._fresh += 1
            seq.started_at = time.perf_counter()
            admitted.append(seq.started_at - seq.enqueued_at)
            self._running.append(seq)
        return admitted, dropped, refused

    def _load_slot(self, slot: int, seq: Sequence) -> None:
        """Write a sequence's state and sampling parameters into its slot's arrays."""
        params = seq.params
        vocab = self.engine.vocab_size
        self._h[:, slot] = seq.h
        self._c[:, slot] = seq.c
        self._greedy[slot] = params.greedy
        self._inv_t[slot] = 1.0 if params.greedy else params.inv_temperature
        self._top_k[slot] = params.top_k if params.top_k < vocab else 0  # k >= V: every word
        self._top_p[slot] = params.top_p
        self._seeded[slot] = params.seed is not None
        self._logprobs[slot] = params.logprobs > 0
        self._no_eos[slot] = params.ignore_eos

    def _retire(self, seq: Sequence) -> None:
        """Give a sequence's slot back (worker thread)."""
        self._unbatch()
        if seq.slot >= 0:
            self._free.append(seq.slot)
            seq.slot = -1
        self._running.remove(seq)

    def _unbatch(self) -> None:
        """Before the running set changes: write the carried state back to the slots."""
        if self._batch is not None and self._batch.carry is not None:
            tokens, h, c = self._batch.carry
            slots = self._batch.slots
            self._h[:, slots] = h
            self._c[:, slots] = c
            self._next[slots] = tokens[:, 0]
        self._batch = None

    def _batch_of(self, batch: list[Sequence]) -> _Batch:
        """The running batch's arrays, rebuilt when the running set has changed."""
        if self._batch is None:
            slots = np.array([seq.slot for seq in batch], np.int64)
            rows = RowParams(
                self._inv_t[slots],
                self._top_k[slots],
                self._top_p[slots],
                self._greedy[slots],
                self._seeded[slots],
            )
            logprobs = np.flatnonzero(self._logprobs[slots]).tolist()
            no_eos = np.flatnonzero(self._no_eos[slots]).tolist()
            shared = self._unseeded
            rngs = [shared if seq.rng is None else seq.rng for seq in batch]
            self._batch = _Batch(slots, rows, logprobs, no_eos, rngs)
        return self._batch

    def _step(self, batch: list[Sequence]) -> _StepResult:
        """Feed every sequence, sample every row, retire the finished (worker thread)."""
        started = time.perf_counter()
        arrays = self._batch_of(batch)
        slots = arrays.slots
        sampled: np.ndarray | None = None
        if self._fresh:
            prefill = [row for row, seq in enumerate(batch) if seq._sampled == 0]
            logits, h, c = self._run_grouped(batch, slots, prefill)
            self._fresh = 0
        else:
            # every row feeds the token sampled for it last step: one engine call
            if arrays.carry is not None:
                feed, h_in, c_in = arrays.carry
            else:
                feed = self._next[slots].reshape(-1, 1)
                h_in, c_in = self._h[:, slots], self._c[:, slots]
            if (
                self._fuse
                and arrays.rows.all_whole
                and not arrays.no_eos
                and len(batch) <= SMALL_BATCH
            ):
                # a small batch sampling whole distributions: the softmax for direct
                # sampling runs in the engine's own call (one onnxruntime call per step)
                weighted = self.engine.run_weighted(feed, h_in, c_in, arrays.rows.inv_t)
                self.engine_calls += 1
                logits, h, c = weighted.logits, weighted.h, weighted.c
                sampled = pick_weighted(weighted.weights, weighted.sums, arrays.rngs)
            else:
                out = self.engine.run(feed, h_in, c_in)
                self.engine_calls += 1
                logits, h, c = out.logits, out.h, out.c
        wanted = arrays.logprobs
        logps = {row: log_softmax(logits[row], batch[row].params.temperature) for row in wanted}
        if sampled is None:
            if arrays.no_eos:
                logits[arrays.no_eos, PAD_ID] = -np.inf
            sampled = sample_rows(logits, arrays.rows, arrays.rngs, self._head)
        tokens = sampled
        top: dict[int, TopLogprobs] = {}
        for row, logp in logps.items():
            ids = top_ids(logp, batch[row].params.logprobs)
            top[row] = TopLogprobs(float(logp[tokens[row]]), ids, logp[ids])
        arrays.carry = (tokens.reshape(-1, 1), h, c)
        for seq, token in zip(batch, tokens.tolist(), strict=True):
            seq._sampled += 1
            if token == PAD_ID or seq._sampled >= seq.max_new_tokens:
                self._retire(seq)  # the loop finishes it from this step's result
        return _StepResult(batch, tokens, h, c, top, time.perf_counter() - started)

    def _run_grouped(
        self, batch: list[Sequence], slots: np.ndarray, prefill: list[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One engine call per distinct feed length; new prompts are fed whole."""
        by_length: dict[int, list[int]] = {}
        for row in prefill:
            by_length.setdefault(len(batch[row].feed), []).append(row)
        fresh_singles = by_length.pop(1, [])
        singles = np.ones(len(batch), bool)
        singles[prefill] = False
        singles[fresh_singles] = True
        logits = np.empty((len(batch), self.engine.vocab_size), np.float32)
        groups = [(1, np.flatnonzero(singles)), *((n, np.array(r)) for n, r in by_length.items())]
        for length, rows in groups:
            if not len(rows):
                continue
            group = slots[rows]
            if length == 1:
                tokens = self._next[group]  # a copy (fancy indexing): the tokens sampled last
                if fresh_singles:
                    at = np.searchsorted(rows, fresh_singles)
                    tokens[at] = [batch[row].feed[0] for row in fresh_singles]
            else:
                tokens = np.array([batch[row].feed for row in rows], dtype=np.int64)
            out = self.engine.run(
                tokens.reshape(len(rows), length), self._h[:, group], self._c[:, group]
            )
            self.engine_calls += 1
            self._h[:, group] = out.h
            self._c[:, group] = out.c
            logits[rows] = out.logits
        return logits, self._h[:, slots], self._c[:, slots]


def _make_head(engine: Engine) -> SamplingHead | None:
    """The onnxruntime sampling head, warmed up, or None (numpy sampling) where it fails."""
    try:
        head = SamplingHead(engine.vocab_size, max(1, engine.intra_op_threads))
        head.warm_up()
        return head
    except Exception:  # onnxruntime raises its own types; numpy sampling still works
        logger.warning("sampling head unavailable; sampling in numpy", exc_info=True)
        return None
