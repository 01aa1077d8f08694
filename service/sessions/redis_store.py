"""The Redis session store: records with the idle TTL, and leased locks any replica honours.

It runs against one Redis node or a Redis Cluster (`cluster=True`). Two rules make the
same code right for both:

- **One slot per session.** Every key of a session shares its hash tag,
  `<prefix>:{<id>}:session` (the record), `:lock` (the lease) and `:expired` (the
  marker below), so each per-session command and script touches one slot, which a
  cluster serves from one shard.
- **No key written by every request.** Nothing global is written on the hot path: a put
  writes its session's record and marker, in its own slot, and nothing else. Work is
  spread over the shards as the sessions are.

What that costs, against a global index scored by last use (figures from
`python -m bench.cluster` on a 2-core machine, README "Capacity plan"):

- `len` (the `simmer_sessions_active` gauge, read at each /metrics scrape) is a SCAN of
  the session keys, per master, summed: exact while no shard fails over mid-scan, but
  O(keys) work at each call, about 6 s per million sessions, most of it in the client.
  Fine to a million sessions or so; past that the gauge needs another source (a count the
  sweeper keeps, or a sample). DBSIZE would be O(1) per node, but counts locks and
  markers too (and anything else in the database).
- Idle expiry is Redis's own TTL. To tell "expired" from "never existed" without an
  index, every put also writes the marker `<prefix>:{<id>}:expired`, which outlives the
  record by TOMBSTONE_TTL_S: `expired(id)` is "marker, but no record". A marker takes
  about 140 bytes (MEMORY USAGE), and one stays a day after each expired session.
- `sweep` counts idle evictions from the markers: a marker still "live" whose record is
  gone is an idle eviction, and one script turns it to "counted", so however many
  replicas sweep, each is counted once. Each sweep goes on with SWEEP_STEPS SCAN steps
  per master from where the last one stopped, so its cost is bounded; an eviction is
  counted within one pass over the keys. One that no pass reaches before its marker lapses
  (TOMBSTONE_TTL_S: only with far more keys per master than sweeps cover in a day) is
  not counted.

Locks are `SET NX` keys with a timeout, so any replica can refuse a concurrent call;
each holds this process's token, which the scripts check before they unlock, renew or
write.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from service.errors import StoreUnavailable
from service.sessions.state import SessionState
from service.sessions.store import EvictionHook, no_hook

TOMBSTONE_TTL_S = 86_400  # how long Redis remembers that a session expired
LIVE, COUNTED = b"live", b"counted"  # a marker's values: record alive, idle eviction counted
SCAN_COUNT = 1000  # keys a SCAN step looks at
BATCH = 256  # script calls sent together by sweep and refresh_locks
SWEEP_STEPS = 20  # SCAN steps one sweep takes on each master (about 20,000 keys)

# Each script's keys are the keys of one session (one slot).
# KEYS: session, marker; ARGV: session TTL (ms), marker TTL (ms)
_GET = """
local record = redis.call('get', KEYS[1])
if record then
  redis.call('pexpire', KEYS[1], ARGV[1])
  redis.call('pexpire', KEYS[2], ARGV[2])
end
return record
"""
# KEYS: session, marker; ARGV: record, session TTL (ms), marker TTL (ms)
_PUT = """
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('set', KEYS[2], 'live', 'PX', ARGV[3])
return 1
"""
# Write the session only while the lock still holds this process's token (0 when not).
# KEYS: lock, session, marker; ARGV: token, record, session TTL (ms), marker TTL (ms)
_PUT_LOCKED = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('set', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('set', KEYS[3], 'live', 'PX', ARGV[4])
return 1
"""
# KEYS: session, marker; ARGV: session TTL (ms), marker TTL (ms)
_TOUCH = """
if redis.call('pexpire', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('pexpire', KEYS[2], ARGV[2])
return 1
"""
# KEYS: session, marker
_DELETE = """
redis.call('del', KEYS[2])
return redis.call('del', KEYS[1])
"""
_EXPIRED = """
if redis.call('exists', KEYS[2]) == 1 and redis.call('exists', KEYS[1]) == 0 then return 1 end
return 0
"""
# An idle eviction, counted once: the marker was live and the record is gone.
_COUNT_EVICTION = """
if redis.call('get', KEYS[2]) == 'live' and redis.call('exists', KEYS[1]) == 0 then
  redis.call('set', KEYS[2], 'counted', 'KEEPTTL')
  return 1
end
return 0
"""
# Delete or extend a lock only while it still holds this process's token (0 when not).
_UNLOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_REFRESH = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""


def _open(url: str, cluster: bool) -> Any:
    """A client for one node, or for a cluster seeded from the node at `url`."""
    options: dict[str, Any] = {"socket_connect_timeout": 2, "socket_timeout": 2}
    if cluster:
        from redis.asyncio.cluster import RedisCluster

        # Past its per-node pool (100 by default) the cluster client refuses a command
        # (MaxConnectionsError) rather than queueing it; one replica can have max_batch
        # plus max_waiting calls (1,280 by default) at one node at once.
        return RedisCluster.from_url(url, max_connections=2048, **options)
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(url, health_check_interval=10, **options)


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    """What a store outage looks like: no connection, a timeout, or a cluster that is
    failing over (CLUSTERDOWN, TRYAGAIN, slots moving or uncovered)."""
    import redis
    from redis.exceptions import (
        AskError,
        ClusterError,
        MasterDownError,
        RedisClusterException,
        TryAgainError,
    )

    return (
        redis.ConnectionError,
        redis.TimeoutError,
        OSError,
        ClusterError,
        MasterDownError,
        TryAgainError,
        AskError,  # MovedError too
        RedisClusterException,  # no node reachable, a slot not covered
    )


class _ClusterScript:
    """A Lua script run on the shard of its keys: EVALSHA, or EVAL (which caches it
    there) where that shard has not seen it yet, a new master after a failover say.
    redis-py's own Script loads a missing script on every master first, which fails for
    every shard while any one master is down."""

    def __init__(self, client: Any, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
        from redis.exceptions import NoScriptError

        try:
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.client.eval(self.source, len(keys), *keys, *args)


class RedisSessionStore:
    """Redis store: one slot per session (record, lock, marker), nothing global written.

    See the module docstring for how `len`, `sweep` and `expired` work without an index.
    """

    def __init__(
        self,
        url: str,
        ttl_s: float,
        prefix: str = "simmer",
        on_evict: EvictionHook = no_hook,
        lock_ttl_s: float = 2.0,
        cluster: bool = False,
    ) -> None:
        self._redis = _open(url, cluster)
        self.cluster = cluster
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.on_evict = on_evict
        self.lock_ttl_s = lock_ttl_s
        self._lock_token = secrets.token_hex(8)  # this process's mark on the locks it holds
        self._locked: set[str] = set()  # sessions this process locked and has not unlocked
        self._unavailable = _unavailable_errors()
        self._sweep_cursors: dict[str, int] = {}  # master -> where the next sweep scans on
        script = partial(_ClusterScript, self._redis) if cluster else self._redis.register_script
        self._get, self._put, self._put_locked = script(_GET), script(_PUT), script(_PUT_LOCKED)
        self._touch, self._delete, self._expired = script(_TOUCH), script(_DELETE), script(_EXPIRED)
        self._count_eviction = script(_COUNT_EVICTION)
        self._unlock, self._refresh = script(_UNLOCK), script(_REFRESH)

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:session"

    def _marker(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:expired"

    def _lock_key(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:lock"

    def _keys(self, session_id: str) -> list[str]:
        return [self._key(session_id), self._marker(session_id)]

    def _ttls_ms(self) -> tuple[int, int]:
        """The record's TTL and its marker's, which outlives it by TOMBSTONE_TTL_S."""
        ttl_ms = int(self.ttl_s * 1000)
        return ttl_ms, ttl_ms + TOMBSTONE_TTL_S * 1000

    async def _call(self, factory: Callable[[], Awaitable[Any]]) -> Any:
        """Run Redis calls; connection trouble or a failing-over cluster becomes
        StoreUnavailable."""
        from redis.exceptions import CrossSlotTransactionError

        try:
            return await factory()
        except CrossSlotTransactionError:
            raise  # a bug here, not an outage
        except self._unavailable as exc:
            raise StoreUnavailable(f"Redis is unavailable: {type(exc).__name__}") from exc

    async def _run_scripts(
        self, script: Any, calls: Sequence[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """Run `script` once per (keys, args), pipelined BATCH at a time: one round trip
        per batch, and on a cluster per batch and shard. A cluster pipeline sends EVAL
        (the source, cached by each shard), since it cannot reload a script it lacks."""
        results: list[Any] = []
        for start in range(0, len(calls), BATCH):
            async with self._redis.pipeline(transaction=False) as pipe:
                for keys, args in calls[start : start + BATCH]:
                    if self.cluster:
                        pipe.eval(script.source, len(keys), *keys, *args)
                    else:
                        await script(keys=keys, args=args, client=pipe)
                results += await pipe.execute()
        return results

    async def get(self, session_id: str) -> SessionState | None:
        keys, ttls = self._keys(session_id), list(self._ttls_ms())
        record = await self._call(lambda: self._get(keys=keys, args=ttls))
        if record is None:
            return None
        assert isinstance(record, bytes)
        return SessionState.decode(record)

    async def put(self, session_id: str, state: SessionState) -> None:
        args = [state.encode(), *self._ttls_ms()]
        await self._call(lambda: self._put(keys=self._keys(session_id), args=args))

    async def put_locked(self, session_id: str, state: SessionState) -> bool:
        keys = [self._lock_key(session_id), *self._keys(session_id)]
        args = [self._lock_token, state.encode(), *self._ttls_ms()]
        return bool(await self._call(lambda: self._put_locked(keys=keys, args=args)))

    async def delete(self, session_id: str) -> bool:
        deleted = await self._call(lambda: self._delete(keys=self._keys(session_id)))
        if deleted:
            self.on_evict("explicit", 1)
        return bool(deleted)

    async def touch(self, session_id: str) -> bool:
        keys, ttls = self._keys(session_id), list(self._ttls_ms())
        return bool(await self._call(lambda: self._touch(keys=keys, args=ttls)))

    async def len(self) -> int:
        """The session records on every master, counted by SCAN (see the module docstring);
        counted as they come, so a large store is never held in memory as a list."""
        pattern = f"{self.prefix}:{{*}}:session"

        async def count() -> int:
            found = 0
            async for _ in self._redis.scan_iter(match=pattern, count=SCAN_COUNT):
                found += 1
            return found

        return int(await self._call(count))

    async def lock(self, session_id: str) -> bool:
        """A lock that lapses after lock_ttl_s unless refreshed, so a crash frees it soon."""
        lock_key, ttl_ms = self._lock_key(session_id), int(self.lock_ttl_s * 1000)
        result = await self._call(
            lambda: self._redis.set(lock_key, self._lock_token, nx=True, px=ttl_ms)
        )
        if result:
            self._locked.add(session_id)
        return bool(result)

    async def unlock(self, session_id: str) -> None:
        self._locked.discard(session_id)
        keys = [self._lock_key(session_id)]
        await self._call(lambda: self._unlock(keys=keys, args=[self._lock_token]))

    async def refresh_locks(self, session_ids: list[str]) -> list[str]:
        """Renew the locks given, pipelined (one round trip per shard and BATCH); return
        those lost. A session unlocked already (its generation is finishing) is neither
        renewed nor lost."""
        mine = [session_id for session_id in session_ids if session_id in self._locked]
        if not mine:
            return []
        args = [self._lock_token, int(self.lock_ttl_s * 1000)]
        calls = [([self._lock_key(session_id)], args) for session_id in mine]
        renewed = await self._call(lambda: self._run_scripts(self._refresh, calls))
        return [
            session_id
            for session_id, ok in zip(mine, renewed, strict=True)
            if not ok and session_id in self._locked  # not unlocked while this was on its way
        ]

    async def _markers_step(self) -> list[bytes]:
        """The next markers of each master: SWEEP_STEPS SCAN steps on from where the last
        sweep stopped there, so a sweep costs the same however many sessions there are."""
        nodes = self._redis.get_primaries() if self.cluster else []
        pattern = f"{self.prefix}:{{*}}:expired"
        keys: list[bytes] = []
        for node in nodes or [None]:
            name = "" if node is None else node.name
            cursor = self._sweep_cursors.get(name, 0)
            for _ in range(SWEEP_STEPS):
                if node is None:
                    cursor, found = await self._redis.scan(cursor, match=pattern, count=SCAN_COUNT)
                else:
                    cursors, found = await self._redis.scan(
                        cursor, match=pattern, count=SCAN_COUNT, target_nodes=node
                    )
                    cursor = cursors[name]
                keys += found
                if cursor == 0:
                    break  # a pass over this master is complete; the next begins anew
            self._sweep_cursors[name] = cursor
        return keys

    async def sweep(self) -> int:
        """Count the sessions Redis has expired (idle evictions): the markers still live
        whose record is gone, each counted once by any replica. Each sweep looks at the
        next SWEEP_STEPS x SCAN_COUNT keys of each master, so an eviction is counted
        within one pass over the keys (many sweeps on a big store)."""
        head, tail = len(self.prefix) + 2, -len("}:expired")
        markers = await self._call(self._markers_step)
        session_ids = [key.decode()[head:tail] for key in markers]
        calls: list[tuple[list[str], list[Any]]] = [(self._keys(sid), []) for sid in session_ids]
        counted = await self._call(lambda: self._run_scripts(self._count_eviction, calls))
        evicted = sum(int(n) for n in counted)
        if evicted:
            self.on_evict("idle", evicted)
        return evicted

    async def expired(self, session_id: str) -> bool:
        """Expired rather than unknown: its marker outlives it by TOMBSTONE_TTL_S."""
        return bool(await self._call(lambda: self._expired(keys=self._keys(session_id))))

    async def ping(self) -> bool:
        """Whether Redis answers; on a cluster, whether any master does (a shard failing
        over makes only its own sessions unavailable, not the replica unready)."""
        nodes = self._redis.get_primaries() if self.cluster else []
        targets: list[dict[str, Any]] = [{"target_nodes": node} for node in nodes] or [{}]
        for target in targets:
            try:
                if await self._call(partial(self._redis.ping, **target)):
                    return True
            except Exception:  # any failure means this node is not answering
                continue
        return False

    async def close(self) -> None:
        await self._redis.aclose()
