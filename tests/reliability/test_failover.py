"""Failover between replicas on one Redis: a session whose replica dies mid-generation
moves to another replica within one lock lease, and never runs on two at once."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from harness.redis import RedisProcess
from service.settings import Settings
from tests.conftest import ServerProcess

GREEDY = {"top_k": 1, "ignore_eos": True}
PROMPT = "recipe for lemon tart |"
# the defaults under test, set explicitly so that the environment cannot change them
LEASE_S = float(Settings.model_fields["session_lock_ttl_s"].default)
REFRESH_S = float(Settings.model_fields["session_lock_refresh_s"].default)
# Redis ends a dead replica's lease at most LEASE_S after the last renewal it received,
# which left the replica before it was killed. The margin only covers that renewal still
# being on its way to Redis, so it can be generous without weakening the test.
MARGIN_S = 1.0


def generate(server: ServerProcess, **body: Any) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/generate", json=body, timeout=60)


def stream_until_cut(
    server: ServerProcess, session_id: str, seen: threading.Event, events: list[dict[str, Any]]
) -> None:
    """A long streaming generation on `session_id` into `events`; sets `seen` once tokens
    arrive."""
    try:
        with httpx.stream(
            "POST",
            f"{server.base_url}/v1/generate",
            timeout=60,
            json={"session_id": session_id, "max_tokens": 1_000_000, "stream": True, **GREEDY},
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    seen.set()
    except httpx.HTTPError:
        pass  # the server was killed under it


def test_a_killed_replicas_session_continues_on_another_within_one_lease(
    start_server: Callable[..., ServerProcess], private_redis: RedisProcess
) -> None:
    assert 3 * REFRESH_S <= LEASE_S <= 3.0  # the defaults promise failover within 3 s
    settings = {
        "store": "redis",
        "redis_url": private_redis.url,
        "max_new_tokens": "1000000",
        "session_lock_ttl_s": str(LEASE_S),
        "session_lock_refresh_s": str(REFRESH_S),
    }
    a = start_server(**settings)
    b = start_server(**settings)
    first = generate(a, prompt=PROMPT, max_tokens=5, **GREEDY)
    assert first.status_code == 200, first.text
    session_id = first.json()["session_id"]

    seen = threading.Event()
    long_call = threading.Thread(target=stream_until_cut, args=(a, session_id, seen, []))
    long_call.start()
    assert seen.wait(30), "replica A never streamed a token"
    # for longer than one lease: A keeps renewing its lock, so B never runs the session too
    held_until = time.monotonic() + LEASE_S + MARGIN_S
    while time.monotonic() < held_until:
        busy = generate(b, session_id=session_id, max_tokens=2, **GREEDY)
        assert busy.status_code == 409, busy.text
        assert busy.json()["error"]["code"] == "session_busy"
        time.sleep(0.1)
    assert long_call.is_alive(), "replica A's generation ended before the kill"

    a.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    refused_at: list[float] = []  # when each attempt that got 409 was sent, after the kill
    while True:
        sent = time.monotonic()
        cont = generate(b, session_id=session_id, max_tokens=2, **GREEDY)
        if cont.status_code == 200:
            break
        assert cont.status_code == 409, cont.text
        assert cont.json()["error"]["code"] == "session_busy"
        refused_at.append(sent)
        assert time.monotonic() - killed < 30, "replica B never got the session"
        time.sleep(0.02)
    wait = time.monotonic() - killed
    print(
        f"\nfailover wait {wait:.2f} s after SIGKILL ({len(refused_at)} attempts refused; "
        f"lease {LEASE_S:g} s, renewed every {REFRESH_S:g} s)"
    )
    a.proc.wait(10)
    long_call.join(30)

    # Once the lease has surely lapsed, the session is free: no attempt sent after that
    # was refused. (A loaded machine sends fewer attempts; it cannot make one refused.)
    late = [round(t - killed, 2) for t in refused_at if t > killed + LEASE_S + MARGIN_S]
    assert late == [], f"refused {late} s after the kill, past the {LEASE_S:g} s lease"
    # B continued from the last call A completed: the cut call left no trace
    reference = generate(b, prompt=PROMPT, max_tokens=7, **GREEDY)
    assert reference.status_code == 200, reference.text
    assert first.json()["text"] + cont.json()["text"] == reference.json()["text"]


def test_a_replica_that_loses_its_lock_stops_and_cannot_overwrite_the_session(
    start_server: Callable[..., ServerProcess], private_redis: RedisProcess
) -> None:
    import redis

    prefix = "simmer-failover"
    settings = {
        "store": "redis",
        "redis_url": private_redis.url,
        "redis_prefix": prefix,
        "max_new_tokens": "1000000",
    }
    a = start_server(**settings)
    b = start_server(**settings)
    first = generate(a, prompt=PROMPT, max_tokens=5, **GREEDY)
    assert first.status_code == 200, first.text
    session_id = first.json()["session_id"]
    seen = threading.Event()
    events: list[dict[str, Any]] = []
    long_call = threading.Thread(target=stream_until_cut, args=(a, session_id, seen, events))
    long_call.start()
    assert seen.wait(30), "replica A never streamed a token"

    # A's lease ends under it (as when A stalls, or loses Redis, for longer than a lease)
    client = redis.Redis.from_url(private_redis.url)
    assert client.delete(f"{prefix}:{{{session_id}}}:lock") == 1
    client.close()
    cont = generate(b, session_id=session_id, max_tokens=2, **GREEDY)
    assert cont.status_code == 200, cont.text
    long_call.join(30)
    assert not long_call.is_alive(), "replica A went on generating without its lock"

    # A stopped, and said its call was not saved
    assert events[-1]["type"] == "error", events[-1]
    assert events[-1]["code"] == "session_lock_lost"
    # A let the session go, and it holds what B made of it: A's write was refused
    again = generate(a, session_id=session_id, max_tokens=2, **GREEDY)
    assert again.status_code == 200, again.text
    reference = generate(b, prompt=PROMPT, max_tokens=9, **GREEDY)
    assert reference.status_code == 200, reference.text
    texts = [first.json()["text"], cont.json()["text"], again.json()["text"]]
    assert "".join(texts) == reference.json()["text"]
