"""Who may start a generation: nobody while draining, and at most `capacity` at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from service.errors import Overloaded, ShuttingDown


class Admission:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity  # running plus waiting for a slot
        self.active = 0  # generations admitted and not yet finished
        self.draining = False
        self._idle = asyncio.Event()  # set while no generation is in progress
        self._idle.set()

    def check(self, count: int = 1) -> None:
        """Raise if `count` new generations would be refused now."""
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self.active + count > self.capacity:
            raise Overloaded("the server is at capacity; retry shortly")

    def enter(self) -> None:
        self.check()
        self.active += 1
        self._idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def drain(self, grace_s: float, stop_all: Callable[[], int]) -> int:
        """Refuse new work, give running generations `grace_s`, then stop the rest with
        `stop_all` (which returns how many it stopped) and wait a little for them."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        ended = stop_all()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 5.0)
        return ended
