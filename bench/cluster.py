"""The figures of the Redis capacity plan (README, Operators): bytes per session in a
Redis Cluster, store operations per generated turn, and turns per second one node serves.

    python -m bench.cluster --bundle BUNDLE [--sessions 20000] [--requests 50000]

It starts its own Redis Cluster (three masters, one replica each) and its own plain
redis-server on loopback ports, and one simmer server on the cluster, then prints JSON:

- `bytes_per_session`: the growth of used_memory, summed over the masters, while
  `sessions` sessions are written through `RedisSessionStore.put` (record and marker),
  and `MEMORY USAGE` of one record and one marker;
- `ops_per_turn`: the commands MONITOR shows on the masters during one continued turn
  of a real generation (`tokens` tokens): those the server sent, and those its scripts ran;
- `node`: redis-benchmark runs of each command of a turn (64 connections, no pipelining,
  random session keys, a record of the book model's size) against one node, and the turns
  per second they add up to: 1 / sum(1 / rate of each command).
Redis and the clients share this machine's cores, so the node figure is a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.sessions import _state
from harness.redis import RedisCluster, RedisProcess
from harness.server import ServiceProcess
from service.sessions import RedisSessionStore, new_session_id
from service.sessions import redis_store as scripts

BOOK = (1, 128)  # layers, hidden: the book model (training/presets.py) the figures are for
GREEDY = {"top_k": 1, "ignore_eos": True}


def _used_memory(ports: list[int]) -> int:
    total = 0
    for port in ports:
        client = redis.Redis(port=port)
        total += int(client.info("memory")["used_memory"])
        client.close()
    return total


def bytes_per_session(cluster: RedisCluster, count: int) -> dict[str, Any]:
    masters = cluster.masters()
    before = _used_memory(masters)

    seconds: dict[str, float] = {}  # what each step took

    async def fill() -> str:
        store = RedisSessionStore(cluster.url, 3600.0, "simmer-bench", cluster=True)
        ids = [new_session_id() for _ in range(count)]
        started = time.perf_counter()
        for start in range(0, count, 64):
            await asyncio.gather(
                *(store.put(sid, _state(*BOOK)) for sid in ids[start : start + 64])
            )
        seconds["put"], started = time.perf_counter() - started, time.perf_counter()
        assert await store.len() == count
        seconds["len"], started = time.perf_counter() - started, time.perf_counter()
        assert await store.sweep() == 0
        seconds["sweep"] = time.perf_counter() - started
        await store.close()
        return ids[-1]

    last = asyncio.run(fill())
    after = _used_memory(masters)
    port = cluster.master_of(f"simmer-bench:{{{last}}}:session")
    client = redis.Redis(port=port)
    record = client.memory_usage(f"simmer-bench:{{{last}}}:session")
    marker = client.memory_usage(f"simmer-bench:{{{last}}}:expired")
    client.close()
    cluster.flush()
    return {
        "sessions": count,
        "record_bytes": len(_state(*BOOK).encode()),
        "bytes_per_session": (after - before) / count,
        "memory_usage_record": record,
        "memory_usage_marker": marker,
        "puts_per_second_one_client": count / seconds["put"],
        "len_seconds": seconds["len"],  # a SCAN of every master
        "one_sweep_seconds": seconds["sweep"],  # bounded: SWEEP_STEPS SCAN steps per master
        "method": "used_memory delta summed over the masters; MEMORY USAGE of one session",
    }


def _monitor(ports: list[int]) -> list[subprocess.Popen[str]]:
    """`redis-cli monitor` on each port: every command each master runs, from now on."""
    cli = shutil.which("redis-cli")
    if cli is None:
        raise RuntimeError("redis-cli is not installed (it comes with redis-server)")
    watchers = [
        subprocess.Popen([cli, "-p", str(port), "monitor"], stdout=subprocess.PIPE, text=True)
        for port in ports
    ]
    time.sleep(0.5)  # until each is subscribed
    return watchers


def _monitored(watchers: list[subprocess.Popen[str]]) -> tuple[dict[str, int], dict[str, int]]:
    """The commands the watchers saw, by name: (sent by clients, run inside scripts)."""
    time.sleep(0.5)  # until the last commands are printed
    sent: dict[str, int] = {}
    scripted: dict[str, int] = {}
    for watcher in watchers:
        watcher.terminate()
        out, _ = watcher.communicate(timeout=10)
        for line in out.splitlines():
            if "[" not in line or '"' not in line:
                continue  # the OK line
            name = line.split('"')[1].lower()
            counts = scripted if "lua]" in line else sent
            counts[name] = counts.get(name, 0) + 1
    return sent, scripted


def ops_per_turn(cluster: RedisCluster, bundle: Path, workdir: Path, tokens: int) -> dict[str, Any]:
    """The commands one continued turn sends to Redis, after a turn that warmed up the
    connections and the script caches."""
    server = ServiceProcess(
        bundle,
        workdir / "server.log",
        store="redis",
        redis_url=cluster.url,
        redis_cluster="true",
        redis_prefix="simmer-bench",
    )
    try:
        server.wait_ready()
        url = f"{server.base_url}/v1/generate"
        body = {"prompt": "recipe for pea soup |", "max_tokens": tokens, **GREEDY}
        session_id = httpx.post(url, json=body, timeout=60).json()["session_id"]
        turn = {"session_id": session_id, "max_tokens": tokens, **GREEDY}
        assert httpx.post(url, json=turn, timeout=60).status_code == 200  # warm-up
        watchers = _monitor(cluster.masters())
        assert httpx.post(url, json=turn, timeout=60).status_code == 200
        sent, scripted = _monitored(watchers)
    finally:
        server.stop()
    return {
        "tokens_per_turn": tokens,
        "sent": sent,
        "round_trips": sum(sent.values()),
        "inside_scripts": scripted,
        "method": "MONITOR on every master around one continued turn (no /metrics scrape)",
    }


def _benchmark(port: int, requests: int, *command: str) -> float:
    """Requests per second redis-benchmark measures for `command` (64 connections)."""
    cli = shutil.which("redis-benchmark")
    if cli is None:
        raise RuntimeError("redis-benchmark is not installed (it comes with redis-server)")
    done = subprocess.run(
        [
            cli,
            "-p",
            str(port),
            "-c",
            "64",
            "-n",
            str(requests),
            "-r",
            "100000000",
            "--csv",
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = list(csv.reader(io.StringIO(done.stdout)))
    return float(rows[-1][1])


def node_turn_rate(workdir: Path, requests: int) -> dict[str, Any]:
    node = RedisProcess(workdir)
    node.start()
    session, marker, lock = (
        f"simmer-bench:{{__rand_int__}}:{suffix}" for suffix in ("session", "expired", "lock")
    )
    record = "x" * len(_state(*BOOK).encode())
    ttl, marker_ttl = "3600000", str(3600000 + scripts.TOMBSTONE_TTL_S * 1000)
    turn = {
        "get": ["EVAL", scripts._GET, "2", session, marker, ttl, marker_ttl],
        "lock": ["SET", lock, "token", "NX", "PX", "2000"],
        "put_locked": [
            "EVAL",
            scripts._PUT_LOCKED,
            "3",
            lock,
            session,
            marker,
            "token",
            record,
            ttl,
            marker_ttl,
        ],
        "unlock": ["EVAL", scripts._UNLOCK, "1", lock, "token"],
    }
    try:
        rates = {name: _benchmark(node.port, requests, *command) for name, command in turn.items()}
    finally:
        node.kill()
    return {
        "commands_per_second": rates,
        "turns_per_second": 1 / sum(1 / rate for rate in rates.values()),
        "method": "redis-benchmark -c 64 -P 1, random keys, one node on this machine",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cluster = RedisCluster(work)
        cluster.start()
        try:
            result = {
                "bytes_per_session": bytes_per_session(cluster, args.sessions),
                "ops_per_turn": ops_per_turn(cluster, args.bundle, work, args.tokens),
            }
        finally:
            cluster.stop()
        result["node"] = node_turn_rate(work, args.requests)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
