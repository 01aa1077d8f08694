"""The Redis session store: records with the idle TTL, and leased locks any replica honours."""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from service.errors import StoreUnavailable
from service.sessions.state import SessionState
from service.sessions.store import EvictionHook, no_hook

TOMBSTONE_TTL_S = 86_400  # how long Redis remembers that a session expired

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
        on_evict: EvictionHook = no_hook,
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
