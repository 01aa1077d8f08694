"""Background tasks over a store: renewing the locks of running generations, and
sweeping expired sessions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from service.errors import StoreUnavailable
from service.sessions.store import SessionStore

logger = logging.getLogger(__name__)


async def refresh_locks_forever(
    store: SessionStore,
    held: Callable[[], list[str]],
    stop: Callable[[str], object],
    ttl_s: float,
    refresh_s: float,
) -> None:
    """Background task: renew the locks of running generations (`held`) every `refresh_s`,
    and `stop` a generation whose lock is lost or might lapse before the next renewal.

    A renewal sent at time t holds the lock until t + ttl_s at the earliest, since Redis
    starts the lease when the command arrives. Ticks come every refresh_s, or a little
    later under load, so a generation is stopped once its lease could end within one and a
    half intervals: with the default 2 s lease and 0.5 s renewals, two renewals may fail in
    a row (Redis unreachable or slow) and the third tick stops the generation half a second
    before its lease can lapse. Its final write is fenced (`put_locked`): if the lock is gone
    by then, nothing it produced overwrites the replica that took the session over.
    StoreUnavailable and a renewal slower than refresh_s are expected; anything else raises.
    """
    loop = asyncio.get_running_loop()
    renewed: dict[str, float] = {}  # session id -> when its last good renewal was sent
    stopped: set[str] = set()  # told to stop; held until they have finished
    failing = False

    def give_up(session_id: str, why: str) -> None:
        logger.warning("session %s: %s; stopping its generation", session_id[:8], why)
        stopped.add(session_id)
        stop(session_id)

    previous = loop.time()
    while True:
        await asyncio.sleep(max(0.0, previous + refresh_s - loop.time()))
        now = loop.time()
        session_ids = held()
        # a lock first seen now was taken since the last tick
        renewed = {sid: renewed.get(sid, previous) for sid in session_ids}
        stopped.intersection_update(session_ids)
        for sid in session_ids:
            if sid not in stopped and renewed[sid] + ttl_s < now + 1.5 * refresh_s:
                give_up(sid, "its lock could not be renewed in time")
        try:
            async with asyncio.timeout(refresh_s):  # not wait_for: it can swallow a cancel
                lost = set(await store.refresh_locks(session_ids))
        except (StoreUnavailable, TimeoutError) as exc:
            if not failing:
                logger.warning("cannot renew session locks: %s", str(exc) or type(exc).__name__)
            failing = True
        else:
            failing = False
            for sid in session_ids:
                if sid not in lost:
                    renewed[sid] = now
                elif sid not in stopped:
                    give_up(sid, "its lock lapsed or was taken over")
        previous = now


async def sweep_forever(store: SessionStore, interval_s: float) -> None:
    """Background task: expire idle sessions and count them."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await store.sweep()
        except StoreUnavailable:
            continue
