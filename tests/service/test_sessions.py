"""One test suite for both session stores, the real Redis included: one node, and a
Redis Cluster of three masters."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import InvalidState, StoreUnavailable
from service.sessions import (
    MemorySessionStore,
    RedisSessionStore,
    SessionState,
    SessionStore,
    new_session_id,
    refresh_locks_forever,
)
from service.sessions.portable import unseal
from service.settings import Settings

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


@dataclass(frozen=True)
class RedisTarget:
    """An emptied test Redis: one node, or a cluster seeded at `url`."""

    url: str
    cluster: bool

    def store(self, ttl_s: float = 60.0, **options: Any) -> RedisSessionStore:
        return RedisSessionStore(self.url, ttl_s, "simmer-test", cluster=self.cluster, **options)

    def client(self) -> Any:
        """A blocking client of the same Redis."""
        import redis
        from redis.cluster import RedisCluster

        if self.cluster:
            return RedisCluster.from_url(self.url)
        return redis.Redis.from_url(self.url)


def _redis_target(request: pytest.FixtureRequest, mode: str) -> RedisTarget:
    if mode == "cluster":
        return RedisTarget(request.getfixturevalue("clean_redis_cluster"), cluster=True)
    return RedisTarget(request.getfixturevalue("clean_redis"), cluster=False)


@pytest.fixture(params=["single", "cluster"])
def redis_target(request: pytest.FixtureRequest) -> RedisTarget:
    """The Redis tests run against one node and against a cluster."""
    return _redis_target(request, request.param)


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def make_store(request: pytest.FixtureRequest) -> Callable[..., tuple[SessionStore, Evictions]]:
    target = None
    if request.param != "memory":
        target = _redis_target(request, "cluster" if request.param == "redis-cluster" else "single")

    def make(ttl_s: float = 60.0, max_sessions: int = 1000) -> tuple[SessionStore, Evictions]:
        evictions: Evictions = []

        def hook(reason: str, count: int) -> None:
            evictions.append((reason, count))

        if target is None:
            return MemorySessionStore(ttl_s, max_sessions, hook), evictions
        return target.store(ttl_s, on_evict=hook), evictions

    return make


def test_state_round_trips_exactly_in_about_a_kibibyte() -> None:
    state = _state()
    data = state.encode()
    back = SessionState.decode(data)
    assert np.array_equal(back.h, state.h) and np.array_equal(back.c, state.c)
    assert (back.pending, back.prev, back.last, back.n_tokens) == (42, 7, 42, 99)
    assert (back.owner, back.model, back.created) == ("key-a", "v1", state.created)
    assert 1024 < len(data) <= 1200


def test_rewind_points_round_trip_and_cost_one_state_each() -> None:
    state = _state()
    plain = len(state.encode())
    for turn in range(10):
        start = state.snapshot()
        state.h = state.h + 1
        state.n_tokens += 5
        state.remember(start, keep=8)
        assert len(state.history) == min(turn + 1, 8)
    data = state.encode()
    assert len(data) == plain + 8 * (20 + 2 * 128 * 4)  # 8 points of 1,044 bytes
    back = SessionState.decode(data)
    assert [p.n_tokens for p in back.history] == [p.n_tokens for p in state.history]
    assert all(
        np.array_equal(a.h, b.h) and np.array_equal(a.c, b.c)
        for a, b in zip(back.history, state.history, strict=True)
    )
    back.rewind(3)
    assert back.n_tokens == state.history[-3].n_tokens and len(back.history) == 5
    assert np.array_equal(back.h, state.history[-3].h)


def test_a_record_from_before_rewind_points_still_reads() -> None:
    state = _state()
    old = b"SMR1" + state.encode()[4:-1]  # the version 1 layout: no rewind points
    back = SessionState.decode(old)
    assert np.array_equal(back.h, state.h) and back.n_tokens == 99 and back.history == []


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


def test_an_idle_expiry_is_told_from_a_delete_or_a_session_never_stored_and_counted_once(
    make_store: Callable[..., tuple[SessionStore, Evictions]],
) -> None:
    async def main() -> None:
        store, evictions = make_store(ttl_s=0.3)
        await store.put("a", _state())
        await store.put("b", _state())
        assert await store.delete("b") is True
        assert await store.expired("a") is False  # alive
        await asyncio.sleep(0.5)
        assert await store.get("a") is None
        await store.sweep()
        await store.sweep()  # a second pass counts nothing new
        assert await store.expired("a") is True
        assert await store.expired("b") is False
        assert await store.expired("never-stored") is False
        assert evictions == [("explicit", 1), ("idle", 1)]
        await store.close()

    run(main())


def test_a_big_stores_sweep_is_spread_over_sweeps_and_counts_every_eviction_once(
    redis_target: RedisTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.sessions import redis_store

    monkeypatch.setattr(redis_store, "SWEEP_STEPS", 1)
    monkeypatch.setattr(redis_store, "SCAN_COUNT", 10)

    async def main() -> list[int]:
        evictions: Evictions = []
        store = redis_target.store(0.3, on_evict=lambda reason, n: evictions.append((reason, n)))
        for n in range(100):
            await store.put(f"s{n}", _state())
        await asyncio.sleep(0.5)
        counts = [await store.sweep() for _ in range(200)]
        assert sum(n for reason, n in evictions if reason == "idle") == 100
        await store.close()
        return counts

    counts = run(main())
    assert sum(counts) == 100
    assert counts[0] < 100  # one sweep looked at part of the store only


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


def test_a_locked_put_writes_only_while_this_process_holds_the_lock(
    make_store: Callable[..., tuple[SessionStore, Evictions]],
) -> None:
    async def main() -> None:
        store, _ = make_store()
        assert await store.put_locked("a", _state()) is False
        assert await store.get("a") is None
        assert await store.lock("a") is True
        assert await store.put_locked("a", _state(seed=1)) is True
        got = await store.get("a")
        assert got is not None and np.array_equal(got.h, _state(seed=1).h)
        assert await store.len() == 1
        await store.unlock("a")
        assert await store.put_locked("a", _state(seed=2)) is False
        got = await store.get("a")
        assert got is not None and np.array_equal(got.h, _state(seed=1).h)
        await store.close()

    run(main())


def test_refreshing_locks_loses_none_that_are_held_or_released(
    make_store: Callable[..., tuple[SessionStore, Evictions]],
) -> None:
    async def main() -> None:
        store, _ = make_store()
        assert await store.refresh_locks([]) == []
        assert await store.lock("a") is True
        assert await store.lock("b") is True
        assert await store.refresh_locks(["a", "b", "never-locked"]) == []
        await store.unlock("b")  # a generation finishing: it is still running, not lost
        assert await store.refresh_locks(["a", "b"]) == []
        assert await store.lock("a") is False  # still held
        await store.close()

    run(main())


def _lapse(target: RedisTarget, lock_key: str) -> None:
    """End a lock's lease now, as if its holder had stalled past it."""
    client = target.client()
    client.delete(lock_key)
    client.close()


def test_a_lock_taken_over_by_another_replica_is_lost_and_fences_the_old_holder(
    redis_target: RedisTarget,
) -> None:
    async def main() -> None:
        old = redis_target.store()
        new = redis_target.store()
        assert await old.lock("a") is True
        assert await new.lock("a") is False
        _lapse(redis_target, "simmer-test:{a}:lock")
        assert await new.lock("a") is True
        assert await new.put_locked("a", _state(seed=1)) is True
        assert await old.refresh_locks(["a"]) == ["a"]  # lost
        assert await old.put_locked("a", _state(seed=2)) is False
        got = await new.get("a")
        assert got is not None and np.array_equal(got.h, _state(seed=1).h)
        await old.unlock("a")  # the old holder's unlock leaves the new lock alone
        assert await old.lock("a") is False
        assert await new.refresh_locks(["a"]) == []
        await old.close()
        await new.close()

    run(main())


@contextlib.asynccontextmanager
async def _refreshing(
    store: SessionStore, held: list[str], stop: Callable[[str], None], ttl_s: float, every_s: float
) -> AsyncIterator[None]:
    """`refresh_locks_forever` running for the body of the block."""
    refresher = asyncio.create_task(
        refresh_locks_forever(store, lambda: held, stop, ttl_s, every_s)
    )
    try:
        yield
    finally:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher


def test_the_refresher_stops_a_generation_whose_lock_was_taken_over(
    redis_target: RedisTarget,
) -> None:
    async def main() -> list[str]:
        old = redis_target.store(lock_ttl_s=2.0)
        new = redis_target.store(lock_ttl_s=2.0)
        assert await old.lock("a") is True and await old.lock("b") is True
        stopped: list[str] = []
        told = asyncio.Event()

        def stop(session_id: str) -> None:
            stopped.append(session_id)
            told.set()

        # Renewals every 0.25 s: each has that long to answer. (At 0.05 s, on a loaded
        # machine, the timeout kept cancelling Redis commands mid-reply, and once the
        # refresher never came back from a cancel.)
        async with _refreshing(old, ["a", "b"], stop, 2.0, 0.25):
            _lapse(redis_target, "simmer-test:{a}:lock")
            assert await new.lock("a") is True
            await asyncio.wait_for(told.wait(), 30)
            await asyncio.sleep(1.0)  # several more ticks: a lost lock is reported once
        await old.close()
        await new.close()
        return stopped

    assert run(main()) == ["a"]


class CutOffRedisStore(RedisSessionStore):
    """A Redis store whose lock renewals stop reaching Redis once `cut` is set."""

    def __init__(self, target: RedisTarget, lock_ttl_s: float) -> None:
        super().__init__(
            target.url, 60, "simmer-test", lock_ttl_s=lock_ttl_s, cluster=target.cluster
        )
        self.cut = False
        self.renewed = asyncio.Event()  # set at each renewal that reached Redis

    async def refresh_locks(self, session_ids: list[str]) -> list[str]:
        if self.cut:
            raise StoreUnavailable("cut off from Redis")
        held = await super().refresh_locks(session_ids)
        self.renewed.set()
        return held


def test_the_refresher_stops_a_generation_before_a_lock_it_cannot_renew_lapses(
    redis_target: RedisTarget,
) -> None:
    probe = redis_target.client()

    async def main() -> tuple[list[str], list[int]]:
        store = CutOffRedisStore(redis_target, lock_ttl_s=3.0)
        assert await store.lock("a") is True
        stopped: list[str] = []
        lease_left_ms: list[int] = []  # what was left of the lock's lease when it was stopped
        told = asyncio.Event()

        def stop(session_id: str) -> None:
            stopped.append(session_id)
            lease_left_ms.append(int(probe.pttl(f"simmer-test:{{{session_id}}}:lock")))
            told.set()

        async with _refreshing(store, ["a"], stop, 3.0, 1.0):
            await asyncio.wait_for(store.renewed.wait(), 30)
            assert stopped == []  # renewed in time: it runs on
            store.cut = True
            await asyncio.wait_for(told.wait(), 30)
        await store.close()
        return stopped, lease_left_ms

    stopped, lease_left_ms = run(main())
    probe.close()
    assert stopped == ["a"]
    assert lease_left_ms[0] > 0  # stopped while its lease still held, not after


def test_a_lock_refresh_too_slow_for_its_lease_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="at most a third of session_lock_ttl_s"):
        Settings(session_lock_ttl_s=1.0, session_lock_refresh_s=0.5)
    settings = Settings(session_lock_ttl_s=1.5, session_lock_refresh_s=0.5)
    assert settings.session_lock_refresh_s == 0.5


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


@pytest.mark.parametrize("cluster", [False, True], ids=["single", "cluster"])
def test_redis_store_reports_an_outage_as_unavailable(cluster: bool) -> None:
    async def main() -> None:
        store = RedisSessionStore("redis://127.0.0.1:1/0", 60, cluster=cluster)
        with pytest.raises(StoreUnavailable):
            await store.get("a")
        assert await store.ping() is False
        await store.close()

    run(main())


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


@given(blob=st.one_of(st.text(max_size=3000), st.binary(max_size=3000).map(_b64)))
@settings(max_examples=300, deadline=None)
def test_any_string_as_a_state_token_is_refused_as_invalid_state(blob: str) -> None:
    with pytest.raises(InvalidState):
        unseal(blob, b"secret", "v1", 1, 128, 60.0)


@given(record=st.binary(max_size=3000), issued=st.floats(allow_nan=True, allow_infinity=True))
@settings(max_examples=300, deadline=None)
def test_a_signed_token_with_any_body_is_refused_or_read_never_a_crash(
    record: bytes, issued: float
) -> None:
    """A secret that leaked, or a bug on the signing side: whatever the signed body holds,
    unseal answers a state or InvalidState (a 400), never an exception that is a 500."""
    version = b"v1"
    body = struct.pack("<Bd", 2, issued) + bytes((len(version),)) + version + record
    blob = _b64(b"SMRS" + hmac.new(b"secret", body, hashlib.sha256).digest() + body)
    try:
        state = unseal(blob, b"secret", "v1", 1, 128, 60.0, now=0.0)
    except InvalidState:
        return
    assert state.h.shape == (1, 128)
