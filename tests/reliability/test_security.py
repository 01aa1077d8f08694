"""API keys, isolation between keys, limits, admission control and signed state."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import ServerProcess

KEY_A = "sk-simmer-alpha-7f3c9e"
KEY_B = "sk-simmer-bravo-1d8a42"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    return error


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Any:
    from tests.conftest import launch_server

    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# mounted secret\n{KEY_B}\n")
    server = launch_server(
        tiny_bundle, tmp_path_factory.mktemp("keyed"), api_keys=KEY_A, api_keys_file=str(key_file)
    )
    yield server
    server.stop()


def test_v1_routes_need_a_valid_key(keyed_server: ServerProcess) -> None:
    url = f"{keyed_server.base_url}/v1/generate"
    body = {"prompt": "recipe for", "max_tokens": 2}
    missing = httpx.post(url, json=body)
    _error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"] == "Bearer"
    _error(httpx.post(url, json=body, headers=auth("sk-wrong")), 401, "unauthorized")
    _error(httpx.post(url, json=body, headers={"Authorization": KEY_A}), 401, "unauthorized")
    assert httpx.post(url, json=body, headers=auth(KEY_A)).status_code == 200
    assert httpx.post(url, json=body, headers=auth(KEY_B)).status_code == 200  # from the file
    _error(httpx.get(f"{keyed_server.base_url}/v1/models"), 401, "unauthorized")


def test_probes_and_metrics_stay_open(keyed_server: ServerProcess) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{keyed_server.base_url}{path}").status_code == 200


def test_another_keys_session_is_404_never_403(keyed_server: ServerProcess) -> None:
    base = keyed_server.base_url
    created = httpx.post(
        f"{base}/v1/generate", json={"prompt": "recipe for", "max_tokens": 2}, headers=auth(KEY_A)
    ).json()
    session_id = created["session_id"]
    assert httpx.get(f"{base}/v1/sessions/{session_id}", headers=auth(KEY_A)).status_code == 200
    for response in (
        httpx.get(f"{base}/v1/sessions/{session_id}", headers=auth(KEY_B)),
        httpx.get(f"{base}/v1/sessions/{session_id}/state", headers=auth(KEY_B)),
        httpx.delete(f"{base}/v1/sessions/{session_id}", headers=auth(KEY_B)),
        httpx.post(
            f"{base}/v1/generate",
            json={"session_id": session_id, "max_tokens": 2},
            headers=auth(KEY_B),
        ),
    ):
        _error(response, 404, "session_not_found")
    unknown = httpx.get(f"{base}/v1/sessions/{'f' * 32}", headers=auth(KEY_B))
    # a session of another key and a session that never existed answer alike
    assert unknown.json()["error"]["code"] == "session_not_found"
    assert httpx.get(f"{base}/v1/sessions/{session_id}", headers=auth(KEY_A)).status_code == 200


def test_websocket_needs_a_key_in_the_header_or_query(keyed_server: ServerProcess) -> None:
    url = f"ws://127.0.0.1:{keyed_server.port}/v1/stream"
    for refused_url in (url, f"{url}?api_key=sk-wrong"):
        with connect(refused_url) as ws:
            # a browser can read why: an error event, then close code 4000 + 401
            event = json.loads(ws.recv(timeout=10))
            assert event["type"] == "error" and event["code"] == "unauthorized"
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
            assert ws.close_code == 4401
    for ws in (connect(f"{url}?api_key={KEY_A}"), connect(url, additional_headers=auth(KEY_B))):
        with ws:
            ws.send(json.dumps({"type": "generate", "prompt": "recipe for", "max_tokens": 2}))
            while (event := json.loads(ws.recv(timeout=30)))["type"] not in ("done", "error"):
                pass
            assert event["type"] == "done"


def test_keys_never_appear_in_logs_or_metrics(keyed_server: ServerProcess) -> None:
    httpx.post(
        f"{keyed_server.base_url}/v1/generate",
        json={"prompt": "x", "max_tokens": 1},
        headers=auth("sk-leaked-wrong-key"),
    )
    metrics = httpx.get(f"{keyed_server.base_url}/metrics").text
    log = keyed_server.log()
    for secret in (KEY_A, KEY_B, "sk-leaked-wrong-key"):
        assert secret not in metrics
        assert secret not in log
    assert 'simmer_request_failure_total{code="unauthorized"}' in metrics


def test_body_over_the_limit_is_413(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(max_body_bytes="2048")
    response = httpx.post(f"{server.base_url}/v1/generate", json={"prompt": "word " * 2000})
    _error(response, 413, "request_too_large")
    assert (
        httpx.post(
            f"{server.base_url}/v1/generate", json={"prompt": "recipe for", "max_tokens": 1}
        ).status_code
        == 200
    )


def test_rate_limit_answers_429_with_retry_after(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server(rate_limit_per_s="0.2", rate_limit_burst="3", api_keys=f"{KEY_A},{KEY_B}")
    url = f"{server.base_url}/v1/models"
    codes = [httpx.get(url, headers=auth(KEY_A)).status_code for _ in range(4)]
    assert codes[:3] == [200, 200, 200]
    limited = httpx.get(url, headers=auth(KEY_A))
    error = _error(limited, 429, "rate_limited")
    assert int(limited.headers["retry-after"]) >= 1 and error["message"]
    # the limit is per key: another key is unaffected
    assert httpx.get(url, headers=auth(KEY_B)).status_code == 200
    assert httpx.get(f"{server.base_url}/healthz").status_code == 200


def test_http_requests_and_websocket_connections_share_a_keys_rate_limit(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server(rate_limit_per_s="0.2", rate_limit_burst="3", api_keys=KEY_A)
    url, ws_url = f"{server.base_url}/v1/models", f"{server.ws_url}?api_key={KEY_A}"
    assert [httpx.get(url, headers=auth(KEY_A)).status_code for _ in range(2)] == [200, 200]
    with connect(ws_url) as ws:  # the bucket's third token
        ws.send(json.dumps({"type": "generate", "prompt": "recipe for", "max_tokens": 1}))
        while (event := json.loads(ws.recv(timeout=30)))["type"] not in ("done", "error"):
            pass
        assert event["type"] == "done"
    with connect(ws_url) as ws:  # the stream is served past Litestar, from the same bucket
        event = json.loads(ws.recv(timeout=10))
        assert event["type"] == "error" and event["code"] == "rate_limited"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 4429
    _error(httpx.get(url, headers=auth(KEY_A)), 429, "rate_limited")


def test_admission_control_refuses_past_the_queue(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server(max_batch="1", max_waiting="0", max_new_tokens="1000000")
    started, checked = threading.Event(), threading.Event()

    def long_stream() -> None:
        # holds the only slot until the checks are done, however fast the engine is
        body = {"prompt": "recipe for", "max_tokens": 1_000_000, "stream": True, "ignore_eos": True}
        with httpx.stream(
            "POST", f"{server.base_url}/v1/generate", timeout=60, json=body
        ) as response:
            for _ in response.iter_lines():
                started.set()
                if checked.is_set():
                    break

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(30)
    refused = httpx.post(
        f"{server.base_url}/v1/generate", json={"prompt": "recipe for", "max_tokens": 2}
    )
    with connect(f"ws://127.0.0.1:{server.port}/v1/stream") as ws:
        ws.send(json.dumps({"type": "generate", "prompt": "recipe for", "max_tokens": 2}))
        ws_error = json.loads(ws.recv(timeout=30))
    checked.set()
    thread.join(60)
    _error(refused, 503, "overloaded")
    assert int(refused.headers["retry-after"]) >= 1
    assert ws_error == {"type": "error", "code": "overloaded", "message": ws_error["message"]}
    # once the long stream's client has gone, its slot frees and requests are served again
    for _ in range(600):
        after = httpx.post(
            f"{server.base_url}/v1/generate", json={"prompt": "recipe for", "max_tokens": 2}
        )
        if after.status_code != 503:
            break
        time.sleep(0.05)
    assert after.status_code == 200, after.text


def test_exported_state_moves_a_session_to_another_server(
    start_server: Callable[..., ServerProcess],
) -> None:
    a = start_server(state_secret="shared-secret")
    b = start_server(state_secret="shared-secret")
    greedy = {"top_k": 1, "ignore_eos": True}
    first = httpx.post(
        f"{a.base_url}/v1/generate", json={"prompt": "recipe for soup |", "max_tokens": 6, **greedy}
    ).json()
    exported = httpx.get(f"{a.base_url}/v1/sessions/{first['session_id']}/state").json()
    restored = httpx.post(f"{b.base_url}/v1/sessions", json={"state": exported["state"]})
    assert restored.status_code == 201
    moved_id = restored.json()["session_id"]
    assert moved_id != first["session_id"]
    on_b = httpx.post(
        f"{b.base_url}/v1/generate", json={"session_id": moved_id, "max_tokens": 6, **greedy}
    ).json()
    on_a = httpx.post(
        f"{a.base_url}/v1/generate",
        json={"session_id": first["session_id"], "max_tokens": 6, **greedy},
    ).json()
    assert on_b["text"] == on_a["text"]


def test_tampered_or_foreign_state_is_refused_with_a_reason(
    start_server: Callable[..., ServerProcess],
) -> None:
    import base64

    server = start_server(state_secret="one-secret")
    other = start_server(state_secret="another-secret")
    session_id = httpx.post(
        f"{server.base_url}/v1/generate", json={"prompt": "recipe for", "max_tokens": 2}
    ).json()["session_id"]
    blob = httpx.get(f"{server.base_url}/v1/sessions/{session_id}/state").json()["state"]
    raw = bytearray(base64.urlsafe_b64decode(blob))
    raw[-5] ^= 0x01
    tampered = base64.urlsafe_b64encode(bytes(raw)).decode()
    for bad, code in ((tampered, "invalid_state"), ("bm90IGEgc3RhdGU=", "invalid_state")):
        response = httpx.post(f"{server.base_url}/v1/sessions", json={"state": bad})
        error = _error(response, 400, code)
        assert error["param"] == "state" and "refused" in error["message"]
    foreign = _error(
        httpx.post(f"{other.base_url}/v1/sessions", json={"state": blob}), 400, "invalid_state"
    )
    assert "signature" in foreign["message"]


def test_state_for_another_model_is_refused() -> None:
    import numpy as np

    from service.errors import InvalidState, render
    from service.sessions import SessionState
    from service.sessions.portable import seal, unseal

    state = SessionState.fresh(1, 8)
    state.h = np.ones((1, 8), np.float32)
    blob = seal(state, b"secret", "model-a")
    assert np.array_equal(unseal(blob, b"secret", "model-a", 1, 8, 60).h, state.h)
    with pytest.raises(InvalidState) as refused:
        unseal(blob, b"secret", "model-b", 1, 8, 60)
    answer = render(refused.value)
    assert answer.status == 400 and answer.code == "state_model_mismatch"
    with pytest.raises(InvalidState, match="does not fit"):
        unseal(blob, b"secret", "model-a", 1, 16, 60)
