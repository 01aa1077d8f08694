"""The output processor, on the event loop: step results become kept tokens.

For each result the engine core posts, it appends every row's token to its request,
checks the stop token, stop strings (`service.engine.text.TextStream`, through the
request's `check`),
the token limit and cancellation, and wakes the request's consumer. A request it ends
keeps the state of the step whose token it kept last, plus that token as its pending
feed, so its session is exactly what the kept tokens imply; tokens the worker sampled
for it after that (it runs a few steps ahead) are dropped.

Under load, waking every stream's consumer for every token costs the loop more than
the tokens are worth: see `OutputProcessor.stride_for`. A decode run's result carries
several steps; they are applied in order in one call, so a consumer woken by the first
finds the rest too.

Nothing here knows about HTTP or onnxruntime.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.engine.request import Request, RequestStatus, TopLogprobs
from simmer.tokenizer import PAD_ID

logger = logging.getLogger(__name__)

# coalescing under load (see OutputProcessor.stride_for)
COALESCE_MIN_BATCH = 8  # smaller batches always stream every token at once
COALESCE_HIGH = 0.25  # the loop's CPU per step, as a share of the engine thread's
COALESCE_LOW = 0.1
COALESCE_EVERY = 4  # steps between stride adjustments (doubling or halving)


@dataclass
class StepStats:
    batch_size: int
    seconds: float


@dataclass
class Hooks:
    """What the output processor reports, for metrics: all called on the event loop."""

    on_step: Callable[[StepStats], None] | None = None
    on_admit: Callable[[float], None] | None = None  # a request's queue time
    on_failure: Callable[[], None] | None = None  # a failed step or a refused request


class OutputProcessor:
    def __init__(self, hooks: Hooks | None = None, max_stride: int = 16) -> None:
        self.hooks = hooks or Hooks()
        self.max_stride = max_stride
        self.live: dict[int, Request] = {}  # submitted and not finished, by request_id
        # told of every request this ends, so the worker frees its slot (set by the core)
        self.release: Callable[[Request], None] | None = None
        self._stride = 1
        self._loop_share = 0.0
        self._loop_cpu_at = time.thread_time()
        self._until_adjust = COALESCE_EVERY

    def start(self) -> None:
        """On the event loop's thread, before the first result: coalescing measures the
        CPU time of this thread."""
        self._loop_cpu_at = time.thread_time()

    def track(self, request: Request) -> None:
        self.live[request.request_id] = request

    def finish(self, request: Request, reason: str) -> None:
        """End `request` with `reason`, keeping the state of its last kept token."""
        if request.done:
            return
        if request._state is not None:
            # the state after the last kept step; its token is pending (unless eos)
            h, c, row = request._state
            request.h, request.c = h[:, row].copy(), c[:, row].copy()
            pending = reason != "eos" and request.tokens
            request.feed = [request.tokens[-1]] if pending else []
            request._state = None
        request.finish_reason = reason
        request.status = RequestStatus.FINISHED
        self.live.pop(request.request_id, None)
        request.event.set()
        if self.release is not None:
            self.release(request)

    def finish_all(self, reason: str) -> int:
        """End every live request with `reason`; returns how many."""
        live = list(self.live.values())
        for request in live:
            self.finish(request, reason)
        return len(live)

    def apply(
        self,
        requests: list[Request],
        tokens: list[int],
        h: np.ndarray,
        c: np.ndarray,
        top: dict[int, TopLogprobs],
        worker_cpu: float,
        more: Sequence[tuple[list[int], np.ndarray, np.ndarray]] = (),
    ) -> None:
        """One step: `tokens[row]` for `requests[row]`, whose state after it is row `row`
        of `h` and `c` (L, B, H); `top` for the rows that asked for logprobs. `more`: a
        run's later steps, (tokens, h, c) each, in order; `worker_cpu` is for them all,
        so the coalescing stride is set once for the result."""
        stride = self.stride_for(len(requests), worker_cpu)
        self._apply_step(requests, tokens, h, c, top, stride)
        for step_tokens, step_h, step_c in more:
            self._apply_step(requests, step_tokens, step_h, step_c, {}, stride)

    def _apply_step(
        self,
        requests: list[Request],
        tokens: list[int],
        h: np.ndarray,
        c: np.ndarray,
        top: dict[int, TopLogprobs],
        stride: int,
    ) -> None:
        for row, request in enumerate(requests):
            if request.done:
                continue  # ended by the loop after the worker took this step
            try:
                self._keep(request, row, tokens[row], h, c, top, stride)
            except Exception:  # a stop check that raised, say: only this request fails
                logger.exception("cannot apply a token to request %d", request.request_id)
                self.finish(request, "error")
                if self.hooks.on_failure is not None:
                    self.hooks.on_failure()

    def _keep(
        self,
        request: Request,
        row: int,
        token: int,
        h: np.ndarray,
        c: np.ndarray,
        top: dict[int, TopLogprobs],
        stride: int,
    ) -> None:
        """One row of a step: keep its token, or end the request."""
        request.status = RequestStatus.RUNNING
        request._state = (h, c, row)
        if token == PAD_ID:
            self.finish(request, "eos")
            return
        if top and row in top:
            request.top.append(top[row])
        request.tokens.append(token)
        reason = request.check(token) if request.check is not None else None
        if reason is not None:
            self.finish(request, reason)
        elif len(request.tokens) >= request.max_new_tokens:
            self.finish(request, "length")
        elif stride == 1 or len(request.tokens) % stride == 1:
            request.event.set()  # else its consumer is woken with the next tokens

    def stride_for(self, batch: int, worker_cpu: float) -> int:
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
