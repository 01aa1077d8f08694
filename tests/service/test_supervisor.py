"""Background tasks under the supervisor: a fault is logged, counted and restarted."""

from __future__ import annotations

import asyncio

import pytest

from service import supervisor as sup
from service.supervisor import Supervisor


async def _until(condition: object, limit: int = 2000) -> None:
    for _ in range(limit):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


def test_a_task_that_raises_is_counted_and_started_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sup, "MIN_BACKOFF_S", 0.0)
    faults: list[str] = []
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise ValueError(f"fault {runs}")
        await asyncio.Event().wait()  # the third run stays up

    async def main() -> dict[str, str]:
        supervisor = Supervisor(on_failure=faults.append)
        supervisor.start("sweeper", flaky)
        await _until(lambda: runs == 3)
        await asyncio.sleep(0)
        problems = supervisor.problems()
        await supervisor.close()
        return problems

    problems = asyncio.run(main())
    assert faults == ["sweeper", "sweeper"]
    assert runs == 3
    assert problems == {}  # running again, and two faults are not yet a crash loop


def test_a_crash_looping_task_is_reported_with_its_last_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sup, "MIN_BACKOFF_S", 0.0)
    monkeypatch.setattr(sup, "MAX_BACKOFF_S", 0.0)
    faults: list[str] = []

    async def broken() -> None:
        raise OSError("store gone")

    async def main() -> dict[str, str]:
        supervisor = Supervisor(on_failure=faults.append)
        supervisor.start("lock_refresher", broken)
        await _until(lambda: len(faults) >= sup.CRASH_LOOP)
        problems = supervisor.problems()
        await supervisor.close()
        return problems

    assert asyncio.run(main()) == {"lock_refresher": "OSError: store gone"}


def test_a_task_that_returns_is_a_fault_too() -> None:
    faults: list[str] = []

    async def quits() -> None:
        return None

    async def main() -> dict[str, str]:
        supervisor = Supervisor(on_failure=faults.append)
        supervisor.start("engine_watchdog", quits)
        await _until(lambda: bool(faults))
        problems = supervisor.problems()  # down until its backoff has passed
        await supervisor.close()
        return problems

    problems = asyncio.run(main())
    assert faults == ["engine_watchdog"]
    assert "returned" in problems["engine_watchdog"]


def test_close_cancels_every_task_and_names_are_unique() -> None:
    cancelled: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    async def main() -> None:
        supervisor = Supervisor(on_failure=lambda name: None)
        supervisor.start("a", lambda: forever("a"))
        supervisor.start("b", lambda: forever("b"))
        with pytest.raises(ValueError, match="already supervised"):
            supervisor.start("a", lambda: forever("a"))
        await asyncio.sleep(0.01)
        await supervisor.close()

    asyncio.run(main())
    assert sorted(cancelled) == ["a", "b"]
