"""Faults with real parts: SIGKILL and restart, SIGTERM drains, Redis outages,
vanished clients, a tampered bundle."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from harness.redis import RedisProcess
from harness.server import free_port
from tests.conftest import ROOT, ServerProcess

GREEDY = {"top_k": 1, "ignore_eos": True}


def generate(server: ServerProcess, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{server.base_url}/v1/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_sessions_survive_sigkill_with_the_redis_store(
    start_server: Callable[..., ServerProcess], private_redis: RedisProcess
) -> None:
    settings = {"store": "redis", "redis_url": private_redis.url}
    server = start_server(**settings)
    whole = generate(server, prompt="recipe for baked beans |", max_tokens=20, **GREEDY)
    first = generate(server, prompt="recipe for baked beans |", max_tokens=10, **GREEDY)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    restarted = start_server(**settings)
    second = generate(restarted, session_id=first["session_id"], max_tokens=10, **GREEDY)
    assert first["text"] + second["text"] == whole["text"]


def test_a_generation_cut_by_sigkill_leaves_the_last_completed_call(
    start_server: Callable[..., ServerProcess], private_redis: RedisProcess
) -> None:
    settings = {
        "store": "redis",
        "redis_url": private_redis.url,
        "max_new_tokens": "100000",
        "session_lock_ttl_s": "1.5",
    }
    server = start_server(**settings)
    first = generate(server, prompt="recipe for rice pudding |", max_tokens=5, **GREEDY)
    session_id = first["session_id"]
    before = httpx.get(f"{server.base_url}/v1/sessions/{session_id}").json()
    seen = threading.Event()

    def long_call() -> None:
        try:
            with httpx.stream(
                "POST",
                f"{server.base_url}/v1/generate",
                timeout=60,
                json={"session_id": session_id, "max_tokens": 100_000, "stream": True, **GREEDY},
            ) as response:
                for line in response.iter_lines():
                    if '"token"' in line:
                        seen.set()
        except httpx.HTTPError:
            pass

    thread = threading.Thread(target=long_call)
    thread.start()
    assert seen.wait(30)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    thread.join(30)
    restarted = start_server(**settings)
    after = httpx.get(f"{restarted.base_url}/v1/sessions/{session_id}").json()
    assert after["tokens"] == before["tokens"]  # the cut call left no trace
    time.sleep(1.6)  # the dead server's lock on the session lapses
    # and the session continues exactly as if the cut call never happened
    reference = generate(restarted, prompt="recipe for rice pudding |", max_tokens=10, **GREEDY)
    cont = generate(restarted, session_id=session_id, max_tokens=5, **GREEDY)
    assert first["text"] + cont["text"] == reference["text"]


def test_sigterm_drains_then_ends_the_rest_with_shutdown(
    start_server: Callable[..., ServerProcess], private_redis: RedisProcess
) -> None:
    settings = {
        "store": "redis",
        "redis_url": private_redis.url,
        "shutdown_grace_s": "1",
        "max_new_tokens": "100000",
    }
    server = start_server(**settings)
    events: list[dict[str, Any]] = []
    seen = threading.Event()

    def long_call() -> None:
        with httpx.stream(
            "POST",
            f"{server.base_url}/v1/generate",
            timeout=60,
            json={"prompt": "recipe for jam |", "max_tokens": 100_000, "stream": True, **GREEDY},
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    seen.set()

    thread = threading.Thread(target=long_call)
    thread.start()
    assert seen.wait(30)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    ready = httpx.get(f"{server.base_url}/readyz")
    refused = httpx.post(
        f"{server.base_url}/v1/generate", json={"prompt": "recipe", "max_tokens": 2}
    )
    thread.join(60)
    assert server.proc.wait(30) == 0
    assert ready.status_code == 503 and ready.json()["draining"] is True
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    done = events[-1]
    assert done["type"] == "done"
    assert done["finish_reason"] == "shutdown"
    # the session was saved: a new process continues it
    restarted = start_server(**settings)
    info = httpx.get(f"{restarted.base_url}/v1/sessions/{done['session_id']}")
    assert info.status_code == 200
    assert (
        info.json()["tokens"] == done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"]
    )


def test_redis_outage_fails_fast_and_recovers(
    start_server: Callable[..., ServerProcess], private_redis: RedisProcess
) -> None:
    server = start_server(store="redis", redis_url=private_redis.url)
    assert generate(server, prompt="recipe for", max_tokens=2)["text"] is not None
    private_redis.kill()
    started = time.monotonic()
    response = httpx.post(
        f"{server.base_url}/v1/generate", json={"prompt": "recipe for", "max_tokens": 2}, timeout=30
    )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "store_unavailable"
    assert response.headers["retry-after"]
    assert time.monotonic() - started < 10  # bounded by the store timeouts, not hanging
    assert httpx.get(f"{server.base_url}/readyz", timeout=30).status_code == 503
    private_redis.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.base_url}/readyz", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "readiness never recovered"
        time.sleep(0.2)
    assert generate(server, prompt="recipe for", max_tokens=2)["usage"]["completion_tokens"] == 2


def test_hundreds_of_vanished_clients_leave_nothing_running(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server(max_batch="64")

    async def ws_client(i: int) -> None:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/v1/stream") as ws:
            await ws.send(
                json.dumps(
                    {"type": "generate", "prompt": "recipe for", "max_tokens": 500, **GREEDY}
                )
            )
            for _ in range(i % 4):  # some vanish before any token, some mid-stream
                await ws.recv()
            ws.transport.abort()  # abrupt: no close frame

    async def sse_client(client: httpx.AsyncClient, i: int) -> None:
        async with client.stream(
            "POST",
            f"{server.base_url}/v1/generate",
            json={"prompt": "recipe for", "max_tokens": 500, "stream": True, **GREEDY},
        ) as response:
            seen = 0
            async for _ in response.aiter_lines():
                seen += 1
                if seen > i % 5:
                    break

    async def main() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            for _ in range(2):
                results = await asyncio.gather(
                    *[ws_client(i) for i in range(100)],
                    *[sse_client(client, i) for i in range(50)],
                    return_exceptions=True,
                )
                unexpected = [
                    r
                    for r in results
                    if isinstance(r, Exception) and not isinstance(r, websockets.ConnectionClosed)
                ]
                assert not unexpected, unexpected[:3]

    asyncio.run(main())
    deadline = time.monotonic() + 30
    while True:
        load = httpx.get(f"{server.base_url}/readyz").json()["load"]
        if load == {
            "generations": 0,
            "running": 0,
            "waiting": 0,
            "free_slots": 64,
            "websockets": 0,
        }:
            break
        assert time.monotonic() < deadline, f"still busy after the clients left: {load}"
        time.sleep(0.1)
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert "simmer_num_requests_running 0.0" in metrics
    assert "simmer_websocket_connections 0.0" in metrics
    assert 'simmer_request_failure_total{code="client_disconnected"}' in metrics
    # and the server still serves
    assert generate(server, prompt="recipe for", max_tokens=3)["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/completions"])
def test_a_json_request_whose_client_leaves_stops_generating(
    start_server: Callable[..., ServerProcess], path: str
) -> None:
    server = start_server(max_new_tokens="1000000")
    body = {"prompt": "recipe for", "max_tokens": 1_000_000, **GREEDY}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server.base_url}{path}", json=body, timeout=httpx.Timeout(10, read=1.0))
    # a million tokens take minutes: the generation must stop soon after the disconnect
    deadline = time.monotonic() + 10
    while (load := httpx.get(f"{server.base_url}/readyz").json()["load"])["generations"]:
        assert time.monotonic() < deadline, f"still generating for a client that left: {load}"
        time.sleep(0.05)
    assert load["running"] == 0
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert 'simmer_request_failure_total{code="client_disconnected"} 1.0' in metrics
    # it ended through the normal path: what it generated before the disconnect is counted
    generated = next(
        float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("simmer_generation_tokens_total ")
    )
    assert 0 < generated < 1_000_000
    assert generate(server, prompt="recipe for", max_tokens=3)["usage"]["completion_tokens"] == 3


def test_a_tampered_bundle_is_refused_at_start(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "/usr/bin:/bin",
            "SIMMER_BUNDLE": str(bundle),
            "SIMMER_PORT": str(free_port()),
        },
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "sha256 mismatch" in lines[0] and "model.onnx" in lines[0]


def test_a_setting_that_is_not_a_boolean_stops_the_start_with_one_line(
    tiny_bundle: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "/usr/bin:/bin",
            "SIMMER_BUNDLE": str(tiny_bundle),
            "SIMMER_PORT": str(free_port()),
            "SIMMER_ACCESS_LOG": "sometimes",
        },
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: SIMMER_ACCESS_LOG: "), lines
