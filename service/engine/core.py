"""The engine core: the worker thread that steps the model, and its command inbox.

The event loop and the worker share no mutable state. The loop sends the worker
commands on one queue (`Submit`, `Cancel`, `Close`); the worker answers with one
`StepResult` per step, posted to the loop (`call_soon_threadsafe`), where the output
processor applies it. Each pass of the worker is schedule, execute, update: take the
commands, admit waiting requests into free slots and plan a step (the scheduler),
feed and sample it (the runner), then count the tokens and retire the requests that
ended (the scheduler again).

A small batch that nothing waits to join steps in runs (`ModelRunner.execute_run`):
one call samples several steps, and one result carries them all. A run starts only
when no command is queued, no waiting request could take a free slot, and every row
may sample at least half the run before its token limit (`RUN_MIN_SHARE`). When a row
draws the stop token or reaches its limit part-way, the steps after it are dropped and
the batch carries on from there.

The worker does not wait for the loop between steps: it posts each result and goes
straight on, so the loop streams step N while the model computes step N + 1. It may
run up to `PIPELINE_DEPTH` results ahead of what the loop has applied (a decode run's
result holds several steps), so a busy loop does not stall the model; a request the
loop ends (a stop string, a cancel) may be stepped a few more times, and those tokens
are dropped.

Supervision: an exception in a step fails the requests of that step, and only those;
one while loading a request into its slot fails that request; the worker goes on.
If the worker dies all the same, `watch_worker` fails what it held and `submit`
refuses new work (`EngineDown`); `worker_alive` and `stalled_for` tell readiness.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from service.engine.head import SamplingHead
from service.engine.model import ModelSession
from service.engine.output import Hooks, OutputProcessor, StepStats
from service.engine.request import Request
from service.engine.runner import RUN_BATCH, ModelRunner, StepOutput
from service.engine.scheduler import Scheduler, StepPlan

logger = logging.getLogger(__name__)

PIPELINE_DEPTH = 16  # results the worker may post ahead of the event loop

# A run starts while every row may still sample at least this share of its steps. The
# steps past a row's limit are computed and dropped, which costs less than the single
# steps they replace: in the server at 1 stream, a single step took 0.35 to 0.43 ms from
# one message to the next, and a run of 8 took 1.1 to 1.35 ms. Before, a 64-token
# generation ended with 7 single steps.
RUN_MIN_SHARE = 0.5


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new work."""


class EngineDown(EngineClosed):
    """The engine worker has died: nothing more can be generated in this process."""


@dataclass(frozen=True)
class Submit:
    request: Request


@dataclass(frozen=True)
class Cancel:
    request: Request


@dataclass(frozen=True)
class Close:
    pass


Command = Submit | Cancel | Close


@dataclass(frozen=True)
class Load:
    """The scheduler's counts as the worker last reported them."""

    running: int = 0
    waiting: int = 0  # seen by the worker, no slot yet
    free: int = 0
    seen: int = 0  # submissions the worker has taken from its inbox so far


@dataclass
class StepResult:
    """What the worker hands the loop after a step, or with nothing but news."""

    requests: list[Request]  # the rows stepped (none: news only)
    output: StepOutput | None  # None when there was no step, or it failed
    admitted: list[float] = field(default_factory=list)  # queue times of new requests
    refused: list[Request] = field(default_factory=list)  # could not be loaded: "error"
    failed: bool = False  # the step raised: every request in `requests` ends with "error"
    cpu: float = 0.0  # the worker thread's CPU seconds since its previous result
    load: Load = field(default_factory=Load)  # the scheduler once this result was made
    more: list[StepOutput] = field(default_factory=list)  # a run's later steps, in order


class EngineCore:
    def __init__(self, runner: ModelRunner, max_batch: int, output: OutputProcessor) -> None:
        self.runner = runner
        self.scheduler = Scheduler(max_batch)
        self.output = output
        self.max_batch = max_batch
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        # One credit per result the worker may post before the loop has applied it. A
        # SimpleQueue (C) costs a fraction of threading.Semaphore (Python) per step.
        self._credits: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(PIPELINE_DEPTH):
            self._credits.put(None)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._down: str | None = None  # why the worker is gone, once the loop has seen it
        self._progress_at = time.monotonic()  # the worker's last sign of life
        self._cpu_at = 0.0
        self._ids = itertools.count(1)
        self._submitted = 0  # loop side: submissions so far
        self._seen = 0  # worker side: submissions taken from the inbox
        self._load = Load(free=max_batch)  # loop side: the last load the worker reported
        # every request the loop ends (a stop string, a cancel...) frees its slot too
        output.release = lambda request: self._inbox.put(Cancel(request))

    # --- the event loop's side ------------------------------------------------------

    @property
    def num_running(self) -> int:
        return self._load.running

    @property
    def num_waiting(self) -> int:
        """Waiting for a slot, or not yet seen by the worker."""
        return self._load.waiting + self._submitted - self._load.seen

    @property
    def free_slots(self) -> int:
        return self._load.free

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.output.start()
        self._thread = threading.Thread(target=self._work_loop, name="simmer-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> Request:
        if self._down is not None:
            raise EngineDown(self._down)
        if self._closed:
            raise EngineClosed("the engine is shutting down")
        if not request.feed:
            raise ValueError("a request needs at least one token to feed")
        request.request_id = next(self._ids)
        request.enqueued_at = time.perf_counter()
        self.output.track(request)
        self._submitted += 1
        self._inbox.put(Submit(request))
        return request

    def cancel(self, request: Request, reason: str = "cancelled") -> None:
        """End `request` now with `reason` (its state is that of its last kept token);
        the worker frees its slot before its next step."""
        self.output.finish(request, reason)

    async def close(self, join_timeout_s: float = 10.0) -> None:
        """Stop the worker and end what it held with "shutdown". A worker hung inside a
        step is left behind after `join_timeout_s` (it is a daemon thread)."""
        self._closed = True
        self._inbox.put(Close())
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, join_timeout_s)
        self.output.finish_all("shutdown")

    def _deliver(self, result: StepResult) -> None:
        """Apply one result on the event loop, then let the worker run one step further."""
        try:
            self._load = result.load
            self._apply(result)
        except Exception:  # a hook that raised, say: its requests fail, the loop goes on
            logger.exception("cannot apply an engine step; ending its requests")
            for request in [*result.requests, *result.refused]:
                self.output.finish(request, "error")
        finally:
            self._credits.put(None)

    def _apply(self, result: StepResult) -> None:
        output, hooks = self.output, self.output.hooks
        for request in result.refused:
            output.finish(request, "error")
        if hooks.on_admit is not None:
            for waited in result.admitted:
                hooks.on_admit(waited)
        if hooks.on_failure is not None and (result.failed or result.refused):
            hooks.on_failure()
        if result.failed:
            for request in result.requests:
                output.finish(request, "error")
            return
        step = result.output
        if step is None:
            return
        if hooks.on_step is not None:
            for each in (step, *result.more):
                hooks.on_step(StepStats(len(result.requests), each.seconds))
        tokens = step.tokens.tolist()
        more = [(each.tokens.tolist(), each.h, each.c) for each in result.more]
        output.apply(result.requests, tokens, step.h, step.c, step.top, result.cpu, more)

    # --- health (read on the event loop) -------------------------------------------

    @property
    def worker_alive(self) -> bool:
        """False once the worker thread has ended without being asked to."""
        return self._thread is None or self._closed or self._thread.is_alive()

    def stalled_for(self) -> float:
        """Seconds work has waited on a worker that made no step (0 while idle or moving).

        The worker marks each pass of its loop; a pass that waits for commands marks it
        again when one arrives. A step that never returns, or a worker that died, leaves
        the mark behind while requests wait.
        """
        if not self.output.live:
            return 0.0
        return max(0.0, time.monotonic() - self._progress_at)

    async def watch_worker(self, interval_s: float) -> None:
        """Background task: once the worker has died, fail what it held (see `fail_all`)."""
        while True:
            await asyncio.sleep(interval_s)
            if not self.worker_alive and self._down is None:
                ended = self.fail_all("the engine worker died; this replica cannot generate")
                logger.critical("the engine worker died; ended %d generations", ended)
                if self.output.hooks.on_failure is not None:
                    self.output.hooks.on_failure()

    def fail_all(self, reason: str) -> int:
        """The worker is gone: end every request with "error" and take no new work.

        Call on the event loop once `worker_alive` is False. Returns how many ended.
        """
        self._down = reason
        return self.output.finish_all("error")

    # --- the worker thread ----------------------------------------------------------

    def _work_loop(self) -> None:
        """The worker: passes of schedule, execute, update, until Close, whatever fails."""
        self._cpu_at = time.thread_time()
        while True:
            self._progress_at = time.monotonic()
            try:
                if not self._work_pass():
                    return
            except Exception:
                logger.exception("engine worker fault; ending the running requests")
                self.runner.drop()
                failed = self.scheduler.clear()
                if not self._post(StepResult(failed, None, failed=True)):
                    return
            except BaseException:
                logger.critical("the engine worker is dying", exc_info=True)
                raise

    def _work_pass(self) -> bool:
        """One pass; False once closed (or the loop is gone)."""
        idle = not self.scheduler.num_running and not self.scheduler.num_waiting
        taken = self._take_commands(block=idle)
        if taken is None:
            return False
        admitted, refused = self._admit()
        try:
            plan = self.scheduler.plan()
            if plan is None:
                # nothing to step; the loop still hears of what changed (counts, refusals)
                news = StepResult([], None, admitted, refused)
                return self._post(news) if taken or refused else True
            steps = self._counted(plan, self._step(plan))
            result = StepResult(plan.requests, steps[0], admitted, refused, more=steps[1:])
        except Exception:
            logger.exception("engine step failed; ending the running requests")
            self.runner.drop()
            result = StepResult(self.scheduler.clear(), None, admitted, refused, failed=True)
        now = time.thread_time()
        result.cpu, self._cpu_at = now - self._cpu_at, now
        return self._post(result)

    def _step(self, plan: StepPlan) -> list[StepOutput]:
        """A run of `plan` where one may start (see the module docstring), else a step."""
        runner, scheduler = self.runner, self.scheduler
        if (
            runner.run_steps
            and len(plan.requests) <= RUN_BATCH
            and self._inbox.empty()
            and not (scheduler.num_waiting and scheduler.free_slots)
            and scheduler.headroom(plan) >= RUN_MIN_SHARE * runner.run_steps
        ):
            run = runner.execute_run(plan)
            if run is not None:
                return run
        return [runner.execute(plan)]

    def _counted(self, plan: StepPlan, steps: list[StepOutput]) -> list[StepOutput]:
        """The scheduler counts each step's tokens; once a row has ended, the steps after
        it are dropped and the runner carries on from the last one kept. The kept steps
        then share the run's time."""
        for i, step in enumerate(steps):
            if self.scheduler.update(plan, step.tokens) and i + 1 < len(steps):
                self.runner.keep(step)
                kept = steps[: i + 1]
                for each in kept:
                    each.seconds *= len(steps) / len(kept)
                return kept
        return steps

    def _take_commands(self, block: bool) -> int | None:
        """Hand queued commands to the scheduler; with `block`, wait for the first one.
        How many it took, or None once Close has come."""
        if not block and self._inbox.empty():
            return 0  # the common case between steps: nothing to take
        try:
            command = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return 0
        self._progress_at = time.monotonic()
        taken = 0
        while True:
            if isinstance(command, Close):
                return None
            taken += 1
            if isinstance(command, Submit):
                self._seen += 1
                self.scheduler.add(command.request)
            else:
                self.scheduler.cancel(command.request)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return taken

    def _admit(self) -> tuple[list[float], list[Request]]:
        """Load newly admitted requests into their slots: their queue times, and those
        that could not be loaded (they end with "error")."""
        pairs = self.scheduler.admit()
        if pairs:
            self.runner.flush()  # before any slot is written again
        waited: list[float] = []
        refused: list[Request] = []
        for request, slot in pairs:
            try:
                self.runner.load(slot, request)
            except Exception:
                logger.exception("cannot admit request %d; ending it", request.request_id)
                self.scheduler.refuse(request)
                refused.append(request)
                continue
            waited.append(time.perf_counter() - request.enqueued_at)
        return waited, refused

    def _post(self, result: StepResult) -> bool:
        """Hand a result to the loop, waiting while PIPELINE_DEPTH are unapplied."""
        scheduler = self.scheduler
        result.load = Load(
            scheduler.num_running, scheduler.num_waiting, scheduler.free_slots, self._seen
        )
        self._credits.get()
        loop = self._loop
        try:
            assert loop is not None
            loop.call_soon_threadsafe(self._deliver, result)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._credits.put(None)
            return False
        return True


def build_engine(
    model: ModelSession,
    max_batch: int,
    hooks: Hooks | None = None,
    max_stride: int = 16,
    fuse_sampling: bool = True,
    sampling_graphs: bool = True,
    decode_runs: bool = True,
) -> EngineCore:
    """An engine core over `model`: the bundle's sampling graphs when it has them (and
    `sampling_graphs`), else sampling in numpy; the softmax fused into the model's call
    for small batches when the bundle has that graph too (and `fuse_sampling`); decode
    runs for small batches when it has decode_run (and `decode_runs`)."""
    threads = max(1, model.intra_op_threads)
    head = SamplingHead.from_bundle(model.bundle, threads) if sampling_graphs else None
    runner = ModelRunner(model, max_batch, head, fuse_sampling, decode_runs)
    return EngineCore(runner, max_batch, OutputProcessor(hooks, max_stride))
