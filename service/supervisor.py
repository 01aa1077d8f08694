"""The service's background tasks, supervised: none of them dies silently.

Each task is a coroutine function that runs until cancelled (a sweeper, a lock
refresher, the engine watchdog). When one raises, the supervisor logs the exception,
counts it (`simmer_task_failures_total{task}`) and starts the task again after a
backoff that doubles from `MIN_BACKOFF_S` up to `MAX_BACKOFF_S`. While a task is down
between a fault and its restart, or has failed `CRASH_LOOP` times within
`CRASH_WINDOW_S`, `problems()` names it, and readiness says so.

Nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

MIN_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
CRASH_LOOP = 3  # faults within CRASH_WINDOW_S that make a task unhealthy
CRASH_WINDOW_S = 60.0

TaskBody = Callable[[], Awaitable[None]]


@dataclass
class _Supervised:
    name: str
    body: TaskBody
    task: asyncio.Task[None] | None = None
    running: bool = False  # inside its body now (not between a fault and its restart)
    faults: deque[float] = field(default_factory=deque)  # monotonic times of recent faults
    last_error: str = ""


class Supervisor:
    """Starts named background tasks and keeps them running."""

    def __init__(self, on_failure: Callable[[str], None]) -> None:
        self.on_failure = on_failure  # called with the task's name at every fault
        self._tasks: dict[str, _Supervised] = {}

    def start(self, name: str, body: TaskBody) -> None:
        """Run `body()` under supervision until `close()`; `name` labels its faults."""
        if name in self._tasks:
            raise ValueError(f"a task named {name!r} is already supervised")
        entry = _Supervised(name, body)
        entry.task = asyncio.create_task(self._keep_running(entry), name=f"simmer-{name}")
        self._tasks[name] = entry

    async def _keep_running(self, entry: _Supervised) -> None:
        backoff = MIN_BACKOFF_S
        while True:
            entry.running = True
            started = time.monotonic()
            try:
                await entry.body()
                raise RuntimeError("returned; background tasks run until cancelled")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                entry.running = False
                entry.last_error = f"{type(exc).__name__}: {exc}"
                entry.faults.append(time.monotonic())
                logger.exception("background task %s failed; restarting", entry.name)
                self.on_failure(entry.name)
                if time.monotonic() - started > CRASH_WINDOW_S:
                    backoff = MIN_BACKOFF_S  # it had been healthy for a while
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def problems(self) -> dict[str, str]:
        """Tasks that are not healthy now, with their last error."""
        now = time.monotonic()
        out: dict[str, str] = {}
        for entry in self._tasks.values():
            while entry.faults and entry.faults[0] < now - CRASH_WINDOW_S:
                entry.faults.popleft()
            done = entry.task is None or entry.task.done()
            if done or not entry.running or len(entry.faults) >= CRASH_LOOP:
                out[entry.name] = entry.last_error or "not running"
        return out

    async def close(self) -> None:
        """Cancel every task and wait for each to end."""
        for entry in self._tasks.values():
            if entry.task is not None:
                entry.task.cancel()
        for entry in self._tasks.values():
            if entry.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await entry.task
        self._tasks.clear()
