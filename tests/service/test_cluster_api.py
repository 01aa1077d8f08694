"""Two real replicas on a real Redis Cluster continue one conversation turn by turn."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx

from harness.redis import RedisCluster
from tests.conftest import ServerProcess

GREEDY = {"top_k": 1, "ignore_eos": True}
PROMPT = "recipe for apple crumble |"


def generate(server: ServerProcess, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{server.base_url}/v1/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def sessions_active(server: ServerProcess) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    found = re.search(r"^simmer_sessions_active (\S+)$", text, re.MULTILINE)
    assert found, "no simmer_sessions_active in /metrics"
    return float(found.group(1))


def test_two_replicas_on_a_cluster_continue_one_conversation_turn_by_turn(
    start_server: Callable[..., ServerProcess],
    clean_redis_cluster: str,
    redis_cluster: RedisCluster,
) -> None:
    settings = {"store": "redis", "redis_url": clean_redis_cluster, "redis_cluster": "true"}
    a = start_server(**settings)
    b = start_server(**settings)
    whole = generate(a, prompt=PROMPT, max_tokens=24, **GREEDY)
    first = generate(a, prompt=PROMPT, max_tokens=4, **GREEDY)
    session_id, text = first["session_id"], first["text"]
    for replica in [b, a, b, a, b]:  # each turn on the other replica
        turn = generate(replica, session_id=session_id, max_tokens=4, **GREEDY)
        assert turn["session_id"] == session_id
        text += turn["text"]
    assert text == whole["text"]
    # both replicas count the sessions of every shard: the whole one and the conversation
    assert sessions_active(a) == sessions_active(b) == 2
    # the conversation's keys live on one shard, next to each other
    master = redis_cluster.master_of(f"simmer:{{{session_id}}}:session")
    assert redis_cluster.master_of(f"simmer:{{{session_id}}}:expired") == master
