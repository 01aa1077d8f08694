"""A generation in flight, as the engine sees it: a `Request` with a status.

The event loop owns a request. The engine core's worker thread reads the fields set
before submission (feed, state, params, limits) and writes only the request's own
random generator (`rng`, which only it uses); what it learns it sends back in step
results, and what the loop decides (a cancel, a stop string) it sends to the worker as
commands. The loop writes the final `h`, `c` and `feed` when the request finishes: the
worker read them when it loaded the request into its slot, before its first step.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.engine.params import SamplingParams, Uniforms, make_rng


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # submitted; the worker has not stepped it yet
    RUNNING = "running"  # at least one step applied
    FINISHED = "finished"  # `finish_reason` says why; `h`, `c` and `feed` are final


@dataclass(frozen=True)
class TopLogprobs:
    """The distribution one token was drawn from: its log-probability and the top words."""

    logprob: float
    ids: np.ndarray
    logprobs: np.ndarray


@dataclass(eq=False)  # a request is equal only to itself
class Request:
    """One generation. The output processor appends to `tokens` and sets `event`."""

    feed: list[int]  # tokens to feed first; once finished, the pending token (if any)
    h: np.ndarray  # (L, H) initial state; the state after the last kept token once finished
    c: np.ndarray
    params: SamplingParams
    max_new_tokens: int
    check: Callable[[int], str | None] | None = None  # per new token: a finish reason, or None
    tokens: list[int] = field(default_factory=list)  # generated and kept
    top: list[TopLogprobs] = field(default_factory=list)  # per kept token, when asked
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)  # set when there is news
    request_id: int = 0
    enqueued_at: float = field(default_factory=time.perf_counter)
    # the output processor's: the state after the last kept step, as (h, c, row) of that
    # step's result; copied into `h` and `c` when the request finishes
    _state: tuple[np.ndarray, np.ndarray, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # a seed gets its own generator; without one the runner's shared one (a fresh
        # generator from OS entropy costs ~25 us, a request's worth of loop time)
        seed = self.params.seed
        self.rng: Uniforms | None = None if seed is None else Uniforms(make_rng(seed))

    @property
    def done(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def steps_run(self) -> int:
        """Engine steps whose token this request kept (or that ended it with eos)."""
        return len(self.tokens) + (self.finish_reason == "eos")
