"""The sessions a caller may see: loaded, created fresh, from a signed state token or as
a fork, rewound, deleted; another key's session looks exactly like a missing one."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from service.errors import (
    RewindTooFar,
    SessionBusy,
    SessionModelMismatch,
    session_expired,
    session_not_found,
)
from service.generation.lease import SessionLease
from service.metrics import Metrics
from service.sessions import MemorySessionStore, SessionState, SessionStore, new_session_id
from service.sessions.portable import seal, unseal


@dataclass(frozen=True)
class ModelShape:
    """What a session of the served model looks like."""

    version: str
    num_layers: int
    hidden_size: int


@dataclass(frozen=True)
class StateTokens:
    """Signing sessions into tokens a client keeps, and back: any replica that shares the
    secret continues from a token without reading its store."""

    secret: bytes
    max_age_s: float

    @classmethod
    def random(cls, max_age_s: float = 86_400.0) -> StateTokens:
        return cls(secrets.token_bytes(32), max_age_s)


class Sessions:
    def __init__(
        self,
        store: SessionStore,
        model: ModelShape,
        ttl_s: float,
        metrics: Metrics,
        *,
        history: int = 8,
        tokens: StateTokens | None = None,
    ) -> None:
        self.store = store
        self.model = model
        self.session_ttl_s = ttl_s
        self.metrics = metrics
        self.history = history  # call starts each session keeps for rewinding
        self.tokens = tokens or StateTokens.random()
        self.store_kind = "memory" if isinstance(store, MemorySessionStore) else "redis"

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

    async def resume(self, session_id: str, owner: str) -> SessionState:
        """`load`, for a call that continues the session (counted by source)."""
        state = await self.load(session_id, owner)
        self.metrics.session_resume.labels(self.store_kind).inc()
        return state

    def fresh(self, owner: str) -> SessionState:
        model = self.model
        return SessionState.fresh(model.num_layers, model.hidden_size, owner, model.version)

    def seal(self, state: SessionState) -> str:
        """The signed token of `state`, as of now."""
        return seal(state, self.tokens.secret, self.model.version)

    def unseal(self, blob: str, owner: str, resume: bool = False) -> SessionState:
        """The session in a signed token, owned by `owner` (400 when it is refused);
        `resume` counts it as a call continuing from a token."""
        model = self.model
        state = unseal(
            blob,
            self.tokens.secret,
            model.version,
            model.num_layers,
            model.hidden_size,
            self.tokens.max_age_s,
        )
        state.owner = owner
        if resume:
            self.metrics.session_resume.labels("state").inc()
        return state

    async def create(
        self, owner: str, state: SessionState | None = None
    ) -> tuple[str, SessionState]:
        """A new session: fresh, or holding an imported or forked state."""
        session_id = new_session_id()
        state = state or self.fresh(owner)
        state.owner = owner
        state.last_used = time.time()
        await self.store.put(session_id, state)
        self.metrics.sessions_created.inc()
        return session_id, state

    async def fork(self, session_id: str, owner: str) -> tuple[str, SessionState]:
        """A new session with the same state and rewind points as `session_id`'s last
        saved state (a generation running on it is not waited for). Nothing is re-fed."""
        source = await self.load(session_id, owner)
        copy = source.copy()
        copy.created = time.time()
        return await self.create(owner, copy)

    async def rewind(self, session_id: str, owner: str, turns: int) -> SessionState:
        """Back to the start of the `turns`-th last call (409 while it generates, or
        when fewer calls are kept)."""
        await self.load(session_id, owner)
        try:
            async with SessionLease(self.store, session_id):
                state = await self.load(session_id, owner)  # as it is now, under the lock
                kept = len(state.history)
                if turns > kept:
                    raise RewindTooFar(
                        f"session {session_id!r} can go back {kept} call"
                        f"{'' if kept == 1 else 's'}; this server keeps the start of each "
                        f"session's last {self.history}",
                        "turns",
                    )
                state.rewind(turns)
                state.last_used = time.time()
                if not await self.store.put_locked(session_id, state):
                    raise SessionBusy(f"session {session_id!r} is generating", "session_id")
                return state
        except SessionBusy as exc:
            raise SessionBusy(
                f"session {session_id!r} is generating; cancel it first", exc.param
            ) from exc

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
