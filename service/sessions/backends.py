"""The two session stores, chosen by name: "memory" or "redis"."""

from __future__ import annotations

from service.sessions.memory import MemorySessionStore
from service.sessions.redis_store import RedisSessionStore
from service.sessions.store import EvictionHook, SessionStore, no_hook


def create_store(
    kind: str,
    *,
    ttl_s: float,
    max_sessions: int,
    redis_url: str,
    prefix: str,
    on_evict: EvictionHook = no_hook,
    lock_ttl_s: float = 2.0,
    redis_cluster: bool = False,
) -> SessionStore:
    if kind == "redis":
        return RedisSessionStore(redis_url, ttl_s, prefix, on_evict, lock_ttl_s, redis_cluster)
    return MemorySessionStore(ttl_s, max_sessions, on_evict)
