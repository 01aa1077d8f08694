"""A session's generation lock, held as `async with`.

Taking it refuses a second generation on the same session, on this replica or any
other sharing the store (`SessionBusy`). It is given back on exit, or earlier with
`release()`: as soon as the call's session is saved, so the client may continue at
once. When the caller goes away while the session is still being written, the lease
is handed off (`hand_off`): the finisher that completes the write releases it, so
nobody continues from the state before that write.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

from service.errors import SessionBusy, StoreUnavailable
from service.sessions import SessionStore


class SessionLease:
    def __init__(self, store: SessionStore, session_id: str) -> None:
        self.store = store
        self.session_id = session_id
        self.held = False
        self.handed_off = False

    async def __aenter__(self) -> SessionLease:
        if not await self.store.lock(self.session_id):
            raise SessionBusy(f"session {self.session_id!r} is already generating", "session_id")
        self.held = True
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if not self.handed_off:
            await self.release()

    async def release(self) -> None:
        """Give the lock back now (once); a store that is down lets it lapse instead."""
        if self.held:
            self.held = False
            with contextlib.suppress(StoreUnavailable):
                await asyncio.shield(self.store.unlock(self.session_id))

    def hand_off(self) -> None:
        """Leave the release to whoever finishes the call (they call `release`)."""
        self.handed_off = True
