"""One test suite for both session stores, the real Redis included."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from service.sessions import (
    MemorySessionStore,
    RedisSessionStore,
    SessionState,
    SessionStore,
    new_session_id,
)

Evictions = list[tuple[str, int]]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def _state(layers: int = 1, hidden: int = 128, seed: int = 0) -> SessionState:
    rng = np.random.default_rng(seed)
    state = SessionState.fresh(layers, hidden, owner="key-a", model="v1")
    state.h = rng.standard_normal((layers, hidden)).astype(np.float32)
    state.c = rng.standard_normal((layers, hidden)).astype(np.float32)
    state.pending, state.prev, state.last, state.n_tokens = 42, 7, 42, 99
    return state


@pytest.fixture(params=["memory", "redis"])
def make_store(
    request: pytest.FixtureRequest, clean_redis: str
) -> Callable[..., tuple[SessionStore, Evictions]]:
    def make(ttl_s: float = 60.0, max_sessions: int = 1000) -> tuple[SessionStore, Evictions]:
        evictions: Evictions = []

        def hook(reason: str, count: int) -> None:
            evictions.append((reason, count))

        if request.param == "memory":
            return MemorySessionStore(ttl_s, max_sessions, hook), evictions
        return RedisSessionStore(clean_redis, ttl_s, "simmer-test", hook), evictions

    return make


def test_state_round_trips_exactly_in_about_a_kibibyte() -> None:
    state = _state()
    data = state.encode()
    back = SessionState.decode(data)
    assert np.array_equal(back.h, state.h) and np.array_equal(back.c, state.c)
    assert (back.pending, back.prev, back.last, back.n_tokens) == (42, 7, 42, 99)
    assert (back.owner, back.model, back.created) == ("key-a", "v1", state.created)
    assert 1024 < len(data) <= 1200


def test_truncated_record_is_refused() -> None:
    with pytest.raises(ValueError, match="truncated"):
        SessionState.decode(_state().encode()[:-4])


def test_session_ids_are_128_random_bits() -> None:
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_put_get_delete_len(make_store: Callable[..., tuple[SessionStore, Evictions]]) -> None:
    async def main() -> None:
        store, evictions = make()
        state = _state()
        await store.put("a", state)
        await store.put("b", _state(seed=1))
        assert await store.len() == 2
        got = await store.get("a")
        assert got is not None and np.array_equal(got.h, state.h)
        assert await store.get("missing") is None
        assert await store.delete("a") is True
        assert await store.delete("a") is False
        assert await store.get("a") is None
        assert await store.len() == 1
        assert evictions == [("explicit", 1)]
        await store.close()

    make = make_store
    run(main())


def test_touch_keeps_a_session_alive(
    make_store: Callable[..., tuple[SessionStore, Evictions]],
) -> None:
    async def main() -> None:
        store, _ = make_store(ttl_s=1.0)
        await store.put("a", _state())
        await asyncio.sleep(0.6)
        assert await store.touch("a") is True
        await asyncio.sleep(0.6)
        assert await store.get("a") is not None
        assert await store.touch("nobody") is False
        await store.close()

    run(main())


def test_idle_sessions_expire_and_are_counted(
    make_store: Callable[..., tuple[SessionStore, Evictions]],
) -> None:
    async def main() -> None:
        store, evictions = make_store(ttl_s=0.3)
        await store.put("a", _state())
        await asyncio.sleep(0.5)
        assert await store.get("a") is None
        await store.sweep()
        assert sum(n for reason, n in evictions if reason == "idle") == 1
        assert await store.len() == 0
        await store.close()

    run(main())


def test_lock_is_exclusive_until_unlocked(
    make_store: Callable[..., tuple[SessionStore, Evictions]],
) -> None:
    async def main() -> None:
        store, _ = make_store()
        assert await store.lock("a") is True
        assert await store.lock("a") is False
        assert await store.lock("b") is True
        await store.unlock("a")
        assert await store.lock("a") is True
        await store.close()

    run(main())


def test_memory_store_evicts_least_recently_used_past_its_cap() -> None:
    async def main() -> None:
        evictions: Evictions = []
        store = MemorySessionStore(60, 3, lambda reason, n: evictions.append((reason, n)))
        for name in "abc":
            await store.put(name, _state())
        await store.get("a")  # a is now the most recently used
        await store.put("d", _state())
        assert await store.get("b") is None
        assert all([await store.get(n) for n in "acd"])
        assert evictions == [("capacity", 1)]

    run(main())


def test_redis_store_reports_an_outage_as_unavailable() -> None:
    from service.sessions import StoreUnavailable

    async def main() -> None:
        store = RedisSessionStore("redis://127.0.0.1:1/0", 60)
        with pytest.raises(StoreUnavailable):
            await store.get("a")
        assert await store.ping() is False
        await store.close()

    run(main())
