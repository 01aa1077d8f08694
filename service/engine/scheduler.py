"""Which requests the next engine step feeds: queues, slots and the step plan.

Pure bookkeeping, owned by the engine core's worker thread: no threads, no
onnxruntime, no event loop, so it can be tested on its own.

A request waits until a slot is free, then runs in that slot until it ends: at the
stop token or its token limit (`update`, from the tokens a step sampled), or when the
event loop cancels it (`cancel`, from a command). Each step feeds every running
request once: a request's first step feeds its whole feed (the prefill), every later
step the token sampled for it last. The plan says whether the running set changed
since the previous step, because then the runner must write the state it carried
between steps back into the slots before anything is loaded into them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from service.engine.request import Request
from simmer.tokenizer import PAD_ID

_MAX_LIMIT = np.iinfo(np.int64).max  # a request's token limit, as a slot array holds it
_SMALL_STEP = 8  # up to this many rows, `update` counts in plain Python


@dataclass
class StepPlan:
    requests: list[Request]  # the batch, one row each
    slots: np.ndarray  # (B,) int64: each row's slot
    prefill: list[int]  # rows fed for the first time (their whole feed)
    changed: bool  # the rows differ from the previous step's


@dataclass
class _Running:
    request: Request
    slot: int


@dataclass
class Scheduler:
    max_batch: int
    _waiting: deque[Request] = field(default_factory=deque)
    _running: dict[int, _Running] = field(default_factory=dict)  # by request_id, in order
    _free: list[int] = field(default_factory=list)
    _changed: bool = True
    _steady: StepPlan | None = None  # the plan while the running set stays the same
    # per slot: tokens sampled for its request so far (kept by the loop or not), and its
    # limit; arrays, so that counting a step is O(1) numpy calls, not a Python loop
    _sampled: np.ndarray = field(init=False)
    _limit: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self._free = list(range(self.max_batch - 1, -1, -1))
        self._sampled = np.zeros(self.max_batch, np.int64)
        self._limit = np.zeros(self.max_batch, np.int64)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def add(self, request: Request) -> None:
        self._waiting.append(request)

    def cancel(self, request: Request) -> None:
        """Forget a request, waiting or running; its slot is free from the next step."""
        if request in self._waiting:
            self._waiting.remove(request)
        elif request.request_id in self._running:
            self._retire(request.request_id)

    def admit(self) -> list[tuple[Request, int]]:
        """Give free slots to waiting requests, oldest first: the (request, slot) pairs."""
        admitted = []
        while self._waiting and self._free:
            request = self._waiting.popleft()
            slot = self._free.pop()
            self._running[request.request_id] = _Running(request, slot)
            self._sampled[slot] = 0
            self._limit[slot] = min(request.max_new_tokens, _MAX_LIMIT)
            admitted.append((request, slot))
            self._changed = True
            self._steady = None
        return admitted

    def refuse(self, request: Request) -> None:
        """An admitted request whose slot could not be loaded: drop it."""
        self._retire(request.request_id)

    def plan(self) -> StepPlan | None:
        """The next step over every running request, or None when nothing runs."""
        if not self._running:
            return None
        if not self._changed and self._steady is not None:
            return self._steady  # every row is fed already: no prefill, no change
        running = list(self._running.values())
        requests = [entry.request for entry in running]
        slots = np.array([entry.slot for entry in running], np.int64)
        prefill = np.flatnonzero(self._sampled[slots] == 0).tolist()
        self._changed = False
        self._steady = StepPlan(requests, slots, [], changed=False)
        return StepPlan(requests, slots, prefill, changed=True)

    def headroom(self, plan: StepPlan) -> int:
        """The fewest tokens any row of `plan` may still sample before its limit."""
        slots = plan.slots
        return int((self._limit[slots] - self._sampled[slots]).min(initial=_MAX_LIMIT))

    def update(self, plan: StepPlan, tokens: np.ndarray | list[int]) -> bool:
        """After a step: count each row's token; retire those that ended (stop token,
        token limit), and say whether any did. The event loop finishes them from the
        same step's result.

        Call it right after the step of `plan`, before anything is admitted or cancelled:
        the counts are per slot, and a slot given to a new request in between would be
        counted for it."""
        slots = plan.slots
        if len(tokens) != len(slots):
            raise ValueError(f"{len(tokens)} tokens for a step of {len(slots)} rows")
        if len(slots) <= _SMALL_STEP:  # a few numpy calls cost more than these rows
            ended = []
            for row, slot in enumerate(slots.tolist()):
                self._sampled[slot] += 1
                if tokens[row] == PAD_ID or self._sampled[slot] >= self._limit[slot]:
                    ended.append(row)
        else:
            self._sampled[slots] += 1
            hit = (np.asarray(tokens) == PAD_ID) | (self._sampled[slots] >= self._limit[slots])
            ended = np.flatnonzero(hit).tolist()
        for row in ended:
            request_id = plan.requests[row].request_id
            if request_id in self._running:
                self._retire(request_id)
        return bool(ended)

    def clear(self) -> list[Request]:
        """After a failed step: drop every running request (their slots are freed)."""
        failed = [entry.request for entry in self._running.values()]
        for request in failed:
            self._retire(request.request_id)
        return failed

    def _retire(self, request_id: int) -> None:
        entry = self._running.pop(request_id)
        self._free.append(entry.slot)
        self._changed = True
        self._steady = None
