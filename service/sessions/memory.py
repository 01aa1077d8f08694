"""The in-process session store: an LRU of session records with an idle TTL."""

from __future__ import annotations

import time
from collections import OrderedDict

from service.sessions.state import SessionState
from service.sessions.store import EvictionHook, no_hook

TOMBSTONES = 10_000  # how many recently expired ids the memory store remembers


class MemorySessionStore:
    """In-process store: LRU order with a size cap, plus an idle TTL."""

    def __init__(self, ttl_s: float, max_sessions: int, on_evict: EvictionHook = no_hook) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.on_evict = on_evict
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._locks: set[str] = set()
        self._expired: OrderedDict[str, None] = OrderedDict()  # recent idle evictions

    def _bury(self, session_id: str) -> None:
        self._expired[session_id] = None
        while len(self._expired) > TOMBSTONES:
            self._expired.popitem(last=False)

    def _is_idle(self, state: SessionState, now: float) -> bool:
        return now - state.last_used > self.ttl_s

    async def get(self, session_id: str) -> SessionState | None:
        record = self._data.get(session_id)
        if record is None:
            return None
        state = SessionState.decode(record)
        if self._is_idle(state, time.time()):
            del self._data[session_id]
            self._bury(session_id)
            self.on_evict("idle", 1)
            return None
        self._data.move_to_end(session_id)
        return state

    async def put(self, session_id: str, state: SessionState) -> None:
        self._data[session_id] = state.encode()
        self._data.move_to_end(session_id)
        evicted = 0
        while len(self._data) > self.max_sessions:
            self._data.popitem(last=False)
            evicted += 1
        if evicted:
            self.on_evict("capacity", evicted)

    async def put_locked(self, session_id: str, state: SessionState) -> bool:
        if session_id not in self._locks:
            return False
        await self.put(session_id, state)
        return True

    async def delete(self, session_id: str) -> bool:
        if self._data.pop(session_id, None) is None:
            return False
        self.on_evict("explicit", 1)
        return True

    async def touch(self, session_id: str) -> bool:
        state = await self.get(session_id)
        if state is None:
            return False
        state.last_used = time.time()
        self._data[session_id] = state.encode()
        return True

    async def len(self) -> int:
        return len(self._data)

    async def lock(self, session_id: str) -> bool:
        if session_id in self._locks:
            return False
        self._locks.add(session_id)
        return True

    async def unlock(self, session_id: str) -> None:
        self._locks.discard(session_id)

    async def refresh_locks(self, session_ids: list[str]) -> list[str]:
        return []  # in-process locks do not lapse: they end with the process

    async def sweep(self) -> int:
        """Drop idle sessions; LRU order means they sit at the front."""
        now = time.time()
        expired = 0
        for session_id in list(self._data):
            if not self._is_idle(SessionState.decode(self._data[session_id]), now):
                break
            del self._data[session_id]
            self._bury(session_id)
            expired += 1
        if expired:
            self.on_evict("idle", expired)
        return expired

    async def expired(self, session_id: str) -> bool:
        return session_id in self._expired

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._data.clear()
