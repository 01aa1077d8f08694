"""The sessions a caller may see: loaded, created fresh or from an imported state,
deleted; another key's session looks exactly like a missing one."""

from __future__ import annotations

import time
from dataclasses import dataclass

from service.errors import SessionBusy, SessionModelMismatch, session_expired, session_not_found
from service.generation.lease import SessionLease
from service.metrics import Metrics
from service.sessions import SessionState, SessionStore, new_session_id


@dataclass(frozen=True)
class ModelShape:
    """What a session of the served model looks like."""

    version: str
    num_layers: int
    hidden_size: int


class Sessions:
    def __init__(
        self, store: SessionStore, model: ModelShape, ttl_s: float, metrics: Metrics
    ) -> None:
        self.store = store
        self.model = model
        self.session_ttl_s = ttl_s
        self.metrics = metrics

    async def load(self, session_id: str, owner: str) -> SessionState:
        state = await self.store.get(session_id)
        if state is None and await self.store.expired(session_id):
            raise session_expired(session_id, self.session_ttl_s)
        if state is None or state.owner != owner:
            # another key's session looks exactly like a missing one: ids cannot be probed
            raise session_not_found(session_id, self.session_ttl_s)
        if state.model != self.model.version:
            raise SessionModelMismatch(
                f"session {session_id!r} belongs to model {state.model}, not {self.model.version}",
                "session_id",
            )
        return state

    def fresh(self, owner: str) -> SessionState:
        model = self.model
        return SessionState.fresh(model.num_layers, model.hidden_size, owner, model.version)

    async def create(
        self, owner: str, state: SessionState | None = None
    ) -> tuple[str, SessionState]:
        """A new session: fresh, or holding an imported state."""
        session_id = new_session_id()
        state = state or self.fresh(owner)
        state.owner = owner
        state.last_used = time.time()
        await self.store.put(session_id, state)
        self.metrics.sessions_created.inc()
        return session_id, state

    async def delete(self, session_id: str, owner: str) -> None:
        await self.load(session_id, owner)
        try:
            async with SessionLease(self.store, session_id):
                await self.store.delete(session_id)
        except SessionBusy as exc:
            raise SessionBusy(
                f"session {session_id!r} is generating; cancel it first", exc.param
            ) from exc

    def expires_at(self, state: SessionState) -> float:
        return state.last_used + self.session_ttl_s
