"""Hostile but well-formed requests over the live server, on every transport.

Each request in `ADMITTED` sits at the edge of what the schema admits: it must be
served (200, a done event), and an ordinary request right after it must be answered
too. Each in `REFUSED` is just past an edge: 422, naming the field, and the server
serves on. JSON, SSE, WebSocket and the OpenAI route all follow the same rules.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import ServerProcess, launch_server

MAX_NEW = 24
LONG_STOP = ["z" * 64, "é" * 64, "\u0000" * 64, "recipe"]

ADMITTED: dict[str, dict[str, Any]] = {
    "top_k near int64 max": {"top_k": 2**31 - 1},
    "top_k at the vocabulary": {"top_k": 500},
    "top_k past the vocabulary with top_p": {"top_k": 501, "top_p": 0.5},
    "denormal temperature": {"temperature": 7.4e-216},
    "smallest double temperature": {"temperature": 5e-324},
    "temperature at the greedy threshold": {"temperature": 1e-4},
    "hottest temperature": {"temperature": 100.0},
    "denormal top_p": {"top_p": 5e-324},
    "top_p just under 1": {"top_p": 1.0 - 1e-16},
    "largest seed": {"seed": 2**63 - 1, "temperature": 100.0},
    "seed zero": {"seed": 0},
    "most logprobs at the lowest temperature": {"logprobs": 20, "temperature": 5e-324},
    "most logprobs at the highest temperature": {"logprobs": 20, "temperature": 100.0},
    "four longest stop strings": {"stop": LONG_STOP},
    "a stop string that is a space": {"stop": [" "]},
    "most tokens, never stopping": {"max_tokens": MAX_NEW, "ignore_eos": True},
    "one token": {"max_tokens": 1},
    "control characters and emoji prompt": {"prompt": "recipe for \u0000\u0007 🍲 \ud7ff |"},
    "a prompt of only punctuation": {"prompt": ".,;:!?()[]{}|" * 20},
    "everything at once": {
        "top_k": 2**31 - 1,
        "top_p": 5e-324,
        "temperature": 5e-324,
        "seed": 2**63 - 1,
        "logprobs": 20,
        "stop": LONG_STOP,
        "ignore_eos": True,
        "max_tokens": MAX_NEW,
    },
}

REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "top_k past int32": ({"top_k": 2**31}, "top_k"),
    "top_k past int64": ({"top_k": 9223372036854775813}, "top_k"),
    "negative top_k": ({"top_k": -1}, "top_k"),
    "negative temperature": ({"temperature": -5e-324}, "temperature"),
    "temperature past 100": ({"temperature": 100.000001}, "temperature"),
    "top_p of zero": ({"top_p": 0.0}, "top_p"),
    "top_p past 1": ({"top_p": 1.0000001}, "top_p"),
    "seed past int64": ({"seed": 2**63}, "seed"),
    "negative seed": ({"seed": -1}, "seed"),
    "no tokens": ({"max_tokens": 0}, "max_tokens"),
    "more tokens than the server allows": ({"max_tokens": MAX_NEW + 1}, "max_tokens"),
    "a googol of tokens": ({"max_tokens": 10**100}, "max_tokens"),
    "more logprobs than the server allows": ({"logprobs": 21}, "logprobs"),
    "five stop strings": ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "an empty stop string": ({"stop": [""]}, "stop"),
}

TRANSPORTS = ["json", "sse", "websocket", "openai", "openai_stream"]


@pytest.fixture(scope="module")
def hostile_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path
) -> Iterator[ServerProcess]:
    server = launch_server(
        tiny_bundle, tmp_path_factory.mktemp("hostile"), max_new_tokens=str(MAX_NEW)
    )
    yield server
    server.stop()


def _body(extra: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": "recipe for soup |", "max_tokens": 8, **extra}


def _send(server: ServerProcess, transport: str, body: dict[str, Any]) -> tuple[int, Any]:
    """(status, last event or JSON body) of one request over `transport`."""
    base = server.base_url
    if transport == "json":
        response = httpx.post(f"{base}/v1/generate", json=body, timeout=60)
        return response.status_code, response.json()
    if transport in ("sse", "openai_stream"):
        path = "/v1/generate" if transport == "sse" else "/v1/completions"
        with httpx.stream("POST", base + path, json={**body, "stream": True}, timeout=60) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, r.json()
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        if transport == "openai_stream":
            assert events[-1] == "[DONE]"
            return 200, json.loads(events[-2])
        return 200, json.loads(events[-1])
    if transport == "openai":
        response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        return response.status_code, response.json()
    with connect(server.ws_url) as socket:
        socket.send(json.dumps({"type": "generate", **body}))
        while True:
            event = json.loads(socket.recv(timeout=60))
            if event["type"] in ("done", "error"):
                return (200 if event["type"] == "done" else 422), event


def _served_after(server: ServerProcess) -> None:
    ordinary = httpx.post(
        f"{server.base_url}/v1/generate",
        json={"prompt": "recipe for bread", "max_tokens": 4},
        timeout=10,
    )
    assert ordinary.status_code == 200, ordinary.text
    assert server.proc.poll() is None


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(ADMITTED))
def test_every_admitted_extreme_is_served_and_the_server_serves_on(
    hostile_server: ServerProcess, case: str, transport: str
) -> None:
    status, last = _send(hostile_server, transport, _body(ADMITTED[case]))
    assert status == 200, last
    if transport in ("sse", "websocket"):
        assert last["type"] == "done", last
        assert last["finish_reason"] in ("length", "stop", "eos")
    elif transport == "json":
        assert last["finish_reason"] in ("length", "stop", "eos")
        for step in last["logprobs"] or []:
            assert 0 <= step["id"] < 500 and step["logprob"] <= 0
    else:
        assert last["choices"][0]["finish_reason"] in ("length", "stop")
    _served_after(hostile_server)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(REFUSED))
def test_every_value_past_an_edge_is_refused_naming_its_field(
    hostile_server: ServerProcess, case: str, transport: str
) -> None:
    extra, field = REFUSED[case]
    status, last = _send(hostile_server, transport, _body(extra))
    assert status == 422, last
    error = last if transport == "websocket" else last["error"]
    assert error["code"] == "invalid_request"
    assert error["param"].split(".")[0] == field, error
    _served_after(hostile_server)
