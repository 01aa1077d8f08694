"""Session state and the stores that keep it between calls.

A session is the LSTM state (h, C) after every token it has *fed*, plus the pending
token: the last one generated but not fed yet. Continuing a session feeds the pending
token and the new prompt in one call, so history is never re-read.

Both stores keep sessions in the same compact binary form (about 1 KiB for the book
model) and share one interface of plain verbs: get, put, delete, touch, len. They know
nothing of HTTP. Evictions are reported to a callback by reason: idle, capacity,
explicit.

A generation holds its session's lock, a lease that lapses unless renewed (so a crashed
replica frees the session within one lease). Two guards keep a lease that lapsed from
letting two replicas generate on one session: `refresh_locks_forever` stops a generation
before its lease can lapse, and the generation's final write is `put_locked`, which
writes only while the lock still holds this process's token.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np

from service.errors import StoreUnavailable

logger = logging.getLogger(__name__)

NO_TOKEN = -1
TOMBSTONES = 10_000  # how many recently expired ids the memory store remembers
TOMBSTONE_TTL_S = 86_400  # how long Redis remembers that a session expired
_MAGIC = b"SMR1"
# magic, layers, hidden, pending, prev, last, n_tokens, created, last_used
_HEADER = struct.Struct("<4sHHiiiqdd")


def new_session_id() -> str:
    """128 random bits, URL-safe."""
    return secrets.token_hex(16)


@dataclass
class SessionState:
    h: np.ndarray  # (L, H) float32
    c: np.ndarray  # (L, H) float32
    pending: int = NO_TOKEN  # generated, not yet fed (then it is also `last`)
    prev: int = NO_TOKEN  # the second-to-last token of the context, for spacing text
    last: int = NO_TOKEN  # the last token of the context
    n_tokens: int = 0  # tokens in the session's context so far (prompt and generated)
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    owner: str = ""  # who may use the session (a key fingerprint); "" when keys are off
    model: str = ""  # the model version the state belongs to

    @classmethod
    def fresh(cls, layers: int, hidden: int, owner: str = "", model: str = "") -> SessionState:
        zeros = np.zeros((layers, hidden), np.float32)
        return cls(h=zeros, c=zeros.copy(), owner=owner, model=model)

    def encode(self) -> bytes:
        layers, hidden = self.h.shape
        owner = self.owner.encode()
        model = self.model.encode()
        header = _HEADER.pack(
            _MAGIC,
            layers,
            hidden,
            self.pending,
            self.prev,
            self.last,
            self.n_tokens,
            self.created,
            self.last_used,
        )
        return b"".join(
            (
                header,
                bytes((len(owner),)),
                owner,
                bytes((len(model),)),
                model,
                np.ascontiguousarray(self.h, np.float32).tobytes(),
                np.ascontiguousarray(self.c, np.float32).tobytes(),
            )
        )

    @classmethod
    def decode(cls, data: bytes) -> SessionState:
        magic, layers, hidden, pending, prev, last, n_tokens, created, last_used = (
            _HEADER.unpack_from(data)
        )
        if magic != _MAGIC:
            raise ValueError("not a simmer session record")
        pos = _HEADER.size
        owner_len = data[pos]
        owner = data[pos + 1 : pos + 1 + owner_len].decode()
        pos += 1 + owner_len
        model_len = data[pos]
        model = data[pos + 1 : pos + 1 + model_len].decode()
        pos += 1 + model_len
        size = layers * hidden * 4
        if len(data) != pos + 2 * size:
            raise ValueError("truncated session record")
        h = np.frombuffer(data, np.float32, layers * hidden, pos).reshape(layers, hidden).copy()
        c = (
            np.frombuffer(data, np.float32, layers * hidden, pos + size)
            .reshape(layers, hidden)
            .copy()
        )
        return cls(h, c, pending, prev, last, n_tokens, created, last_used, owner, model)


EvictionHook = Callable[[str, int], None]  # (reason, count)

# Delete or extend a lock, or write its session, only while the lock still holds this
# process's token; each returns 0 when it does not.
_UNLOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_REFRESH = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: lock, session, index; ARGV: token, record, session TTL (ms), last used, session id
_PUT_LOCKED = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('set', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('zadd', KEYS[3], ARGV[4], ARGV[5])
return 1
"""


class SessionStore(Protocol):
    """Plain verbs over session records; `touch` marks a session used now.

    `put_locked` is `put` only while this process holds the session's lock (False when it
    does not). `refresh_locks` renews the locks given and returns those this process has
    lost (lapsed, or taken by another replica); a lock it released is not lost.
    """

    async def get(self, session_id: str) -> SessionState | None: ...
    async def put(self, session_id: str, state: SessionState) -> None: ...
    async def put_locked(self, session_id: str, state: SessionState) -> bool: ...
    async def delete(self, session_id: str) -> bool: ...
    async def touch(self, session_id: str) -> bool: ...
    async def len(self) -> int: ...
    async def lock(self, session_id: str) -> bool: ...
    async def unlock(self, session_id: str) -> None: ...
    async def refresh_locks(self, session_ids: list[str]) -> list[str]: ...
    async def sweep(self) -> int: ...
    async def expired(self, session_id: str) -> bool: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...


def _no_hook(reason: str, count: int) -> None:
    return None


class MemorySessionStore:
    """In-process store: LRU order with a size cap, plus an idle TTL."""

    def __init__(self, ttl_s: float, max_sessions: int, on_evict: EvictionHook = _no_hook) -> None:
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


class RedisSessionStore:
    """Redis store: one key per session with the idle TTL, plus an index for counting.

    The sorted set `<prefix>:sessions` scores each session by its last use, so `len`
    is one ZCARD and `sweep` can count the sessions Redis expired as idle evictions.
    Locks are `SET NX` keys with a timeout, so any replica can refuse a concurrent call;
    each holds this process's token, which the scripts check before they unlock, renew or
    write.
    """

    def __init__(
        self,
        url: str,
        ttl_s: float,
        prefix: str = "simmer",
        on_evict: EvictionHook = _no_hook,
        lock_ttl_s: float = 2.0,
    ) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=2, health_check_interval=10
        )
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.on_evict = on_evict
        self.lock_ttl_s = lock_ttl_s
        self._lock_token = secrets.token_hex(8)  # this process's mark on the locks it holds
        self._locked: set[str] = set()  # sessions this process locked and has not unlocked
        self._unlock = self._redis.register_script(_UNLOCK)
        self._refresh = self._redis.register_script(_REFRESH)
        self._put_locked = self._redis.register_script(_PUT_LOCKED)
        self._index = f"{prefix}:sessions"

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}"

    def _tombstone(self, session_id: str) -> str:
        return f"{self.prefix}:expired:{session_id}"

    async def _call(self, factory: Callable[[], Awaitable[Any]]) -> Any:
        """Run one Redis call; connection trouble becomes StoreUnavailable."""
        import redis

        try:
            return await factory()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"Redis is unavailable: {type(exc).__name__}") from exc

    async def get(self, session_id: str) -> SessionState | None:
        ttl_ms = int(self.ttl_s * 1000)
        record = await self._call(lambda: self._redis.getex(self._key(session_id), px=ttl_ms))
        if record is None:
            return None
        assert isinstance(record, bytes)
        return SessionState.decode(record)

    async def put(self, session_id: str, state: SessionState) -> None:
        ttl_ms = int(self.ttl_s * 1000)

        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._key(session_id), state.encode(), px=ttl_ms)
                pipe.zadd(self._index, {session_id: state.last_used})
                await pipe.execute()

        await self._call(write)

    async def put_locked(self, session_id: str, state: SessionState) -> bool:
        written = await self._call(
            partial(
                self._put_locked,
                keys=[self._lock_key(session_id), self._key(session_id), self._index],
                args=[
                    self._lock_token,
                    state.encode(),
                    int(self.ttl_s * 1000),
                    state.last_used,
                    session_id,
                ],
            )
        )
        return bool(written)

    async def delete(self, session_id: str) -> bool:
        async def remove() -> int:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(session_id))
                pipe.zrem(self._index, session_id)
                deleted, _ = await pipe.execute()
            return int(deleted)

        deleted = await self._call(remove)
        if deleted:
            self.on_evict("explicit", 1)
        return bool(deleted)

    async def touch(self, session_id: str) -> bool:
        now = time.time()
        ttl_ms = int(self.ttl_s * 1000)

        async def refresh() -> bool:
            alive = await self._redis.pexpire(self._key(session_id), ttl_ms)
            if alive:
                await self._redis.zadd(self._index, {session_id: now}, xx=True)
            return bool(alive)

        return bool(await self._call(refresh))

    async def len(self) -> int:
        return int(await self._call(lambda: self._redis.zcard(self._index)))

    def _lock_key(self, session_id: str) -> str:
        return f"{self.prefix}:lock:{session_id}"

    async def lock(self, session_id: str) -> bool:
        """A lock that lapses after lock_ttl_s unless refreshed, so a crash frees it soon."""
        result = await self._call(
            partial(
                self._redis.set,
                self._lock_key(session_id),
                self._lock_token,
                nx=True,
                px=int(self.lock_ttl_s * 1000),
            )
        )
        if result:
            self._locked.add(session_id)
        return bool(result)

    async def unlock(self, session_id: str) -> None:
        self._locked.discard(session_id)
        await self._call(
            partial(self._unlock, keys=[self._lock_key(session_id)], args=[self._lock_token])
        )

    async def refresh_locks(self, session_ids: list[str]) -> list[str]:
        """Renew the locks given, in one round trip; return those lost. A session unlocked
        already (its generation is finishing) is neither renewed nor lost."""
        mine = [session_id for session_id in session_ids if session_id in self._locked]
        if not mine:
            return []
        ttl_ms = int(self.lock_ttl_s * 1000)

        async def renew() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for session_id in mine:
                    await self._refresh(
                        keys=[self._lock_key(session_id)],
                        args=[self._lock_token, ttl_ms],
                        client=pipe,
                    )
                results: list[Any] = await pipe.execute()
            return results

        renewed = await self._call(renew)
        return [
            session_id
            for session_id, ok in zip(mine, renewed, strict=True)
            if not ok and session_id in self._locked  # not unlocked while this was on its way
        ]

    async def sweep(self) -> int:
        """Count and unindex the sessions Redis has expired (idle evictions)."""
        cutoff = time.time() - self.ttl_s
        stale = await self._call(lambda: self._redis.zrangebyscore(self._index, "-inf", cutoff))
        assert isinstance(stale, list)
        evicted = 0
        for raw in stale:
            session_id = raw.decode()
            exists = await self._call(partial(self._redis.exists, self._key(session_id)))
            if exists:
                continue  # used on another replica since; its score is refreshed on next put
            removed = await self._call(partial(self._redis.zrem, self._index, session_id))
            if removed:
                await self._call(
                    partial(self._redis.set, self._tombstone(session_id), b"1", ex=TOMBSTONE_TTL_S)
                )
            evicted += int(removed)
        if evicted:
            self.on_evict("idle", evicted)
        return evicted

    async def expired(self, session_id: str) -> bool:
        """Expired rather than unknown: still indexed past its TTL, or remembered as expired."""
        score = await self._call(partial(self._redis.zscore, self._index, session_id))
        if score is not None and float(score) < time.time() - self.ttl_s:
            return True
        return bool(await self._call(partial(self._redis.exists, self._tombstone(session_id))))

    async def ping(self) -> bool:
        try:
            return bool(await self._call(self._redis.ping))
        except Exception:  # any failure means not ready
            return False

    async def close(self) -> None:
        await self._redis.aclose()


def create_store(
    kind: str,
    *,
    ttl_s: float,
    max_sessions: int,
    redis_url: str,
    prefix: str,
    on_evict: EvictionHook = _no_hook,
    lock_ttl_s: float = 2.0,
) -> SessionStore:
    if kind == "redis":
        return RedisSessionStore(redis_url, ttl_s, prefix, on_evict, lock_ttl_s)
    return MemorySessionStore(ttl_s, max_sessions, on_evict)


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
