"""Engine faults on a real server process: a failing step fails only its generations, a
dead or hung worker turns readiness and liveness false, and a fault in the WebSocket
stream's own loop closes only that connection.

The server is `tests.support.faulty_service`: the shipped service whose engine worker
acts on a file dropped into a folder (raise, kill, hang) before its next step, and
whose stream does (stream) before its next message.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.conftest import ServerProcess

LONG = {"max_tokens": 100_000, "ignore_eos": True, "top_k": 1}
FAULTY = "tests.support.faulty_service"


@pytest.fixture
def faults(tmp_path: Path) -> Path:
    folder = tmp_path / "faults"
    folder.mkdir()
    return folder


def _start(start_server: Callable[..., ServerProcess], faults: Path, **extra: str) -> ServerProcess:
    return start_server(module=FAULTY, test_faults=str(faults), max_new_tokens="100000", **extra)


def _metric(server: ServerProcess, line_start: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not in /metrics")


def _wait_for(what: str, condition: Callable[[], bool], limit_s: float = 60) -> None:
    """Poll until `condition` holds; the limit only keeps a broken server from hanging CI."""
    give_up = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def _running(server: ServerProcess) -> int:
    load: dict[str, int] = httpx.get(f"{server.base_url}/readyz", timeout=10).json()["load"]
    return load["running"]


class SSE:
    """A streaming /v1/generate read line by line on its own thread."""

    def __init__(self, server: ServerProcess, body: dict[str, Any]) -> None:
        self.events: list[dict[str, Any]] = []
        self.ended = threading.Event()
        self._server, self._body = server, body
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        url = f"{self._server.base_url}/v1/generate"
        try:
            with httpx.stream("POST", url, json={**self._body, "stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(json.loads(line[6:]))
        finally:
            self.ended.set()

    def kinds(self) -> list[str]:
        return [event["type"] for event in self.events]


def _ws_until(socket: ClientConnection, kinds: tuple[str, ...]) -> dict[str, Any]:
    while True:
        event: dict[str, Any] = json.loads(socket.recv(timeout=60))
        if event["type"] in kinds:
            return event


@pytest.fixture
def json_call() -> Iterator[Callable[[ServerProcess, dict[str, Any]], list[httpx.Response]]]:
    threads: list[threading.Thread] = []

    def call(server: ServerProcess, body: dict[str, Any]) -> list[httpx.Response]:
        answer: list[httpx.Response] = []
        url = f"{server.base_url}/v1/generate"

        def post() -> None:
            # a server the test kills ends the call with no answer
            with contextlib.suppress(httpx.HTTPError):
                answer.append(httpx.post(url, json=body, timeout=60))

        thread = threading.Thread(target=post, daemon=True)
        thread.start()
        threads.append(thread)
        return answer

    yield call
    for thread in threads:
        thread.join(60)


def test_a_failing_step_fails_its_generations_on_every_transport_and_the_next_succeeds(
    start_server: Callable[..., ServerProcess],
    faults: Path,
    json_call: Callable[[ServerProcess, dict[str, Any]], list[httpx.Response]],
) -> None:
    server = _start(start_server, faults)
    base = server.base_url
    first = httpx.post(
        f"{base}/v1/generate", json={"prompt": "recipe for soup |", "max_tokens": 5}, timeout=30
    ).json()
    session_id = first["session_id"]
    saved = httpx.get(f"{base}/v1/sessions/{session_id}", timeout=10).json()

    sse = SSE(server, {"session_id": session_id, **LONG})
    _wait_for("a streamed token", lambda: "token" in sse.kinds())
    with connect(server.ws_url) as socket:
        socket.send(json.dumps({"type": "generate", "prompt": "recipe for stew", **LONG}))
        _ws_until(socket, ("token",))
        answer = json_call(server, {"prompt": "recipe for cake", **LONG})
        _wait_for("three generations in the engine", lambda: _running(server) == 3)

        (faults / "raise").touch()

        error = _ws_until(socket, ("error", "done"))
        assert error["type"] == "error" and error["code"] == "engine_error"
        # the connection stays usable: its next generation (a new session: the failed
        # call's session was never saved) succeeds
        socket.send(json.dumps({"type": "generate", "prompt": "recipe for stew", "max_tokens": 3}))
        assert _ws_until(socket, ("error", "done"))["type"] == "done"

    assert sse.ended.wait(60)
    assert sse.kinds()[-1] == "error" and sse.events[-1]["code"] == "engine_error"
    assert "done" not in sse.kinds()
    _wait_for("the JSON answer", lambda: bool(answer))
    assert answer[0].status_code == 500
    assert answer[0].json()["error"]["code"] == "engine_error"

    # the streamed session stays as its last completed call left it
    after = httpx.get(f"{base}/v1/sessions/{session_id}", timeout=10).json()
    assert (after["tokens"], after["pending_token"]) == (saved["tokens"], saved["pending_token"])
    again = httpx.post(
        f"{base}/v1/generate", json={"session_id": session_id, "max_tokens": 3}, timeout=30
    )
    assert again.status_code == 200, again.text
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
    assert _metric(server, "simmer_engine_failures_total") == 1.0
    assert _metric(server, 'simmer_request_failure_total{code="engine_error"}') == 3.0


def test_a_killed_worker_fails_its_streams_and_turns_readiness_and_liveness_false(
    start_server: Callable[..., ServerProcess], faults: Path
) -> None:
    server = _start(start_server, faults, engine_stall_s="2")
    base = server.base_url
    sse = SSE(server, {"prompt": "recipe for bread", **LONG})
    _wait_for("a streamed token", lambda: "token" in sse.kinds())
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200

    (faults / "kill").touch()

    assert sse.ended.wait(60)
    assert sse.events[-1] == {
        "type": "error",
        "code": "engine_error",
        "message": sse.events[-1]["message"],
    }
    _wait_for("readiness turns false", lambda: httpx.get(f"{base}/readyz").status_code == 503)
    ready = httpx.get(f"{base}/readyz", timeout=10).json()
    assert ready["status"] == "not_ready" and "died" in ready["engine"]
    health = httpx.get(f"{base}/healthz", timeout=10)
    assert health.status_code == 503 and "died" in health.json()["reason"]
    refused = httpx.post(f"{base}/v1/generate", json={"prompt": "recipe for x"}, timeout=10)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "engine_unavailable"
    assert _metric(server, "simmer_engine_failures_total") == 1.0


def test_a_hung_worker_turns_readiness_and_liveness_false_after_the_stall_deadline(
    start_server: Callable[..., ServerProcess],
    faults: Path,
    json_call: Callable[[ServerProcess, dict[str, Any]], list[httpx.Response]],
) -> None:
    server = _start(start_server, faults, engine_stall_s="1")
    base = server.base_url
    assert httpx.post(f"{base}/v1/generate", json={"prompt": "recipe for x"}).status_code == 200

    (faults / "hang").touch()
    json_call(server, {"prompt": "recipe for tea", **LONG})

    _wait_for("readiness turns false", lambda: httpx.get(f"{base}/readyz").status_code == 503)
    ready = httpx.get(f"{base}/readyz", timeout=10).json()
    assert "no step" in ready["engine"]
    health = httpx.get(f"{base}/healthz", timeout=10)
    assert health.status_code == 503 and "no step" in health.json()["reason"]
    server.proc.kill()  # the hung call holds its request until the process goes


def test_a_fault_in_the_streams_own_loop_closes_that_connection_counted_and_logged(
    start_server: Callable[..., ServerProcess], faults: Path
) -> None:
    server = _start(start_server, faults)
    failures = 'simmer_request_failure_total{code="internal_error"}'
    with connect(server.ws_url) as ws:  # the metric exists once a first failure is counted
        (faults / "stream").touch()
        ws.send(json.dumps({"type": "generate", "prompt": "recipe for", "max_tokens": 1}))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
        assert ws.close_code == 1011
    assert _metric(server, failures) == 1
    assert _metric(server, "simmer_websocket_connections") == 0  # its close was counted
    assert "WebSocket connection failed" in server.log()
    assert "injected stream fault" in server.log()
    with connect(server.ws_url) as ws:  # the server, and the next connection, carry on
        ws.send(json.dumps({"type": "generate", "prompt": "recipe for", "max_tokens": 2}))
        while (event := json.loads(ws.recv(timeout=30)))["type"] not in ("done", "error"):
            pass
        assert event["type"] == "done"
    assert httpx.get(f"{server.base_url}/readyz", timeout=10).status_code == 200
    assert _metric(server, failures) == 1
