"""A Redis Cluster master killed under live sessions: the other shards serve on, its own
sessions are unavailable (503) until its replica takes over, then continue intact."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import redis

from harness.redis import RedisCluster
from tests.conftest import ServerProcess

GREEDY = {"top_k": 1, "ignore_eos": True}
PROMPT = "recipe for cherry clafoutis |"
PREFIX = "simmer-cluster-failover"
PER_SHARD = 2  # sessions each master holds before one is killed
TAKEOVER_LIMIT_S = 120  # generous: the test never asserts how long the takeover took


def generate(server: ServerProcess, **body: Any) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/generate", json=body, timeout=60)


def sessions_active(server: ServerProcess) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    found = re.search(r"^simmer_sessions_active (\S+)$", text, re.MULTILINE)
    assert found, "no simmer_sessions_active in /metrics"
    return float(found.group(1))


class Conversations:
    """Sessions on a server, each with the text it has generated so far."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.texts: dict[str, str] = {}

    def start(self) -> str:
        response = generate(self.server, prompt=PROMPT, max_tokens=3, **GREEDY)
        assert response.status_code == 200, response.text
        session_id: str = response.json()["session_id"]
        self.texts[session_id] = response.json()["text"]
        return session_id

    def turn(self, session_id: str) -> httpx.Response:
        """One more token; kept when it succeeded."""
        response = generate(self.server, session_id=session_id, max_tokens=1, **GREEDY)
        if response.status_code == 200:
            self.texts[session_id] += response.json()["text"]
        return response


def test_a_killed_master_makes_only_its_sessions_unavailable_until_its_replica_takes_over(
    start_server: Callable[..., ServerProcess], private_redis_cluster: RedisCluster
) -> None:
    cluster = private_redis_cluster
    server = start_server(
        store="redis", redis_url=cluster.url, redis_cluster="true", redis_prefix=PREFIX
    )
    reference = generate(server, prompt=PROMPT, max_tokens=200, **GREEDY)
    assert reference.status_code == 200, reference.text
    conversations = Conversations(server)

    # sessions on every shard
    by_master: dict[int, list[str]] = {port: [] for port in cluster.masters()}
    for _ in range(200):
        if min(len(ids) for ids in by_master.values()) >= PER_SHARD:
            break
        session_id = conversations.start()
        by_master[cluster.master_of(f"{PREFIX}:{{{session_id}}}:session")].append(session_id)
    assert min(len(ids) for ids in by_master.values()) >= PER_SHARD, by_master

    victim = sorted(by_master)[0]
    failed = by_master[victim]
    healthy = [sid for port, ids in by_master.items() if port != victim for sid in ids]
    # Replication is asynchronous: let the replica acknowledge every write first, so that
    # what this test checks is the takeover, not a write lost in the last millisecond.
    client = redis.Redis(port=victim)
    assert client.wait(1, 10_000) >= 1
    client.close()

    cluster.kill(victim)
    killed = time.monotonic()
    answered = None  # when a session of the failed shard was first served again
    refusals = 0
    while answered is None:
        assert time.monotonic() - killed < TAKEOVER_LIMIT_S, "the replica never took over"
        for session_id in healthy:  # the other shards serve on throughout
            response = conversations.turn(session_id)
            assert response.status_code == 200, response.text
        response = conversations.turn(failed[0])
        if response.status_code == 200:
            answered = time.monotonic()
        else:
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "store_unavailable"
            refusals += 1
        time.sleep(0.05)
    print(
        f"\nfailed shard: 503 for {answered - killed:.2f} s after SIGKILL "
        f"({refusals} refusals); {len(healthy)} sessions on the other shards served throughout"
    )
    assert refusals >= 1  # it was unavailable, and said so, before the takeover

    # every session, the failed shard's included, continues where it was
    for session_id in conversations.texts:
        response = conversations.turn(session_id)
        assert response.status_code == 200, response.text
    whole = reference.json()["text"]
    for session_id, text in conversations.texts.items():
        assert whole.startswith(text), (session_id, text)
    # nothing lost: every conversation and the reference session, counted over the shards
    assert sessions_active(server) == len(conversations.texts) + 1
