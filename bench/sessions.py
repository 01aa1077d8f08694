"""Memory per stored session, in the memory store and in Redis.

Sessions are the records the service stores after a call: `SessionState` with the
book model's (h, C), an owner fingerprint and the model version, written through the
stores' own `put`. Memory store: the bytes tracemalloc sees allocated for `count`
sessions (and the RSS growth). Redis: the growth of `INFO memory` used_memory while
`count` sessions are written under a prefix of their own, after which every key the
measurement wrote is deleted.
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import time
import tracemalloc
from typing import Any

from bench.procstat import rss_bytes
from service.sessions import MemorySessionStore, RedisSessionStore, SessionState, new_session_id
from service.sessions.redis_store import TOMBSTONE_TTL_S

MODEL_VERSION = "0123456789ab"  # bundle versions are 12 hex digits
OWNER = "k_" + "0" * 14  # an API-key fingerprint


def _state(layers: int, hidden: int) -> SessionState:
    state = SessionState.fresh(layers, hidden, OWNER, MODEL_VERSION)
    state.h[:] = 0.25  # real values, not zeros: the size must not depend on them
    state.c[:] = -0.5
    state.pending, state.prev, state.last, state.n_tokens = 17, 5, 9, 1234
    return state


async def _fill(store: Any, count: int, layers: int, hidden: int, concurrency: int = 64) -> None:
    ids = [new_session_id() for _ in range(count)]
    for start in range(0, count, concurrency):
        await asyncio.gather(
            *(store.put(sid, _state(layers, hidden)) for sid in ids[start : start + concurrency])
        )


def memory_store(count: int, layers: int, hidden: int) -> dict[str, Any]:
    store = MemorySessionStore(ttl_s=3600.0, max_sessions=count + 1)
    gc.collect()
    rss_before = rss_bytes(os.getpid())
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    asyncio.run(_fill(store, count, layers, hidden))
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    rss_after = rss_bytes(os.getpid())
    stored = asyncio.run(store.len())
    record = len(_state(layers, hidden).encode())
    del store
    gc.collect()
    return {
        "sessions": stored,
        "record_bytes": record,
        "bytes_per_session": (after - before) / stored,
        "rss_bytes_per_session": (rss_after - rss_before) / stored,
        "method": "tracemalloc",
    }


async def _fill_redis(client: Any, prefix: str, count: int, layers: int, hidden: int) -> list[str]:
    """The commands `RedisSessionStore.put` sends, pipelined 1,000 sessions at a time
    (the store sends one transaction per session, far too slow for 100,000)."""
    ttl_ms = 3600 * 1000
    ids = [new_session_id() for _ in range(count)]
    for start in range(0, count, 1000):
        pipe = client.pipeline(transaction=False)
        for sid in ids[start : start + 1000]:
            state = _state(layers, hidden)
            pipe.set(f"{prefix}:{{{sid}}}:session", state.encode(), px=ttl_ms)
            pipe.set(f"{prefix}:{{{sid}}}:expired", b"live", px=ttl_ms + TOMBSTONE_TTL_S * 1000)
        await pipe.execute()
    return ids


async def _redis_measure(url: str, count: int, layers: int, hidden: int) -> dict[str, Any]:
    import redis.asyncio as aioredis

    prefix = f"simmer-bench-{secrets.token_hex(4)}"
    client = aioredis.Redis.from_url(url)
    store = RedisSessionStore(url, ttl_s=3600.0, prefix=prefix)
    try:
        before = int((await client.info("memory"))["used_memory"])
        started = time.perf_counter()
        ids = await _fill_redis(client, prefix, count, layers, hidden)
        seconds = time.perf_counter() - started
        after = int((await client.info("memory"))["used_memory"])
        # the store itself must see what was written: same keys, same records
        stored = await store.len()
        readable = await store.get(ids[-1]) is not None
    finally:
        deleted = 0
        async for keys in _batches(client, f"{prefix}:*"):
            deleted += await client.delete(*keys)
        await store.close()
        await client.aclose()
    return {
        "sessions": stored,
        "bytes_per_session": (after - before) / max(stored, 1),
        "used_memory_delta": after - before,
        "write_seconds": seconds,
        "keys_deleted": deleted,
        "readable_by_store": readable,
        "method": "INFO memory used_memory delta",
        "url_db": url.rsplit("/", 1)[-1],
    }


async def _batches(client: Any, pattern: str, size: int = 1000) -> Any:
    batch = []
    async for key in client.scan_iter(match=pattern, count=size):
        batch.append(key)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def redis_store(url: str, count: int, layers: int, hidden: int) -> dict[str, Any]:
    return asyncio.run(_redis_measure(url, count, layers, hidden))


def record_bytes(layers: int, hidden: int, history: int) -> dict[str, int]:
    """A session record's size with no rewind points and with `history` of them (each
    call start kept for rewinding is one more state), and its signed state token's."""
    from service.sessions import SessionState
    from service.sessions.portable import seal

    state = SessionState.fresh(layers, hidden, owner="0" * 16, model="simmer-lstm-" + "0" * 12)
    plain = len(state.encode())
    token = len(seal(state, b"bench", state.model))
    state.history = [state.snapshot()] * history
    return {
        "no_rewind_points": plain,
        f"{history}_rewind_points": len(state.encode()),
        "state_token": token,
    }
