"""Fuzzing with real parts: schemathesis over the live OpenAPI document, and hypothesis
over the WebSocket protocol."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from tests.conftest import ServerProcess, launch_server

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
        "negative_data_rejection",
    ]
)


@pytest.fixture(scope="module")
def fuzz_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path
) -> Iterator[ServerProcess]:
    server = launch_server(
        tiny_bundle, tmp_path_factory.mktemp("fuzz"), max_new_tokens="32", max_prompt_tokens="256"
    )
    yield server
    server.stop()


def test_openapi_fuzzing_finds_no_server_error_and_no_schema_mismatch(
    fuzz_server: ServerProcess, tmp_path: Path
) -> None:
    junit = tmp_path / "schemathesis.xml"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{fuzz_server.base_url}/schema/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            os.environ.get("SIMMER_FUZZ_EXAMPLES", "40"),
            "--workers",
            "1",
            "--seed",
            "20261129",
            "--report",
            "junit",
            "--report-junit-path",
            str(junit),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary
    counts = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert counts is not None, summary
    generated, passed = map(int, counts.groups())
    assert generated == passed, summary
    assert generated >= 300, summary  # every operation was reached, many times over
    selected = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", summary)
    assert selected is not None, summary
    assert len(set(selected.groups())) == 1, summary  # every operation in the document
    assert fuzz_server.proc.poll() is None  # and the server is still up


def _reply_kinds(ws: ClientConnection) -> list[str]:
    """Every message the server sent within a short while; each must be a known event."""
    kinds: list[str] = []
    while True:
        try:
            raw = ws.recv(timeout=0.3)
        except TimeoutError:
            return kinds
        assert isinstance(raw, str), "the server only sends text frames"
        message = json.loads(raw)
        assert message["type"] in {"session", "token", "done", "error"}, message
        if message["type"] == "error":
            assert message["code"] and message["message"]
        kinds.append(message["type"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
generate_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["generate", "cancel", "Generate", "", "nope"])},
    optional={
        "prompt": st.one_of(st.text(max_size=50), json_values),
        "max_tokens": st.one_of(st.integers(-5, 40), json_values),
        "temperature": st.one_of(st.floats(-1, 3, allow_nan=False), json_values),
        "top_k": st.one_of(st.integers(-2, 50), json_values),
        "top_p": st.one_of(st.floats(-0.5, 1.5, allow_nan=False), json_values),
        "seed": st.one_of(st.integers(-2, 2**64), json_values),
        "stop": st.one_of(st.lists(st.text(max_size=6), max_size=6), json_values),
        "logprobs": st.one_of(st.integers(-1, 30), json_values),
        "session_id": st.one_of(st.text(max_size=70), json_values),
    },
)
frames = st.one_of(
    generate_like.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200),
    st.just("x" * 100_000),
)


@pytest.fixture(scope="module")
def fuzz_socket(fuzz_server: ServerProcess) -> Iterator[ClientConnection]:
    with connect(f"ws://127.0.0.1:{fuzz_server.port}/v1/stream", max_size=None) as ws:
        yield ws


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(frame=frames)
def test_malformed_websocket_frames_get_error_events_and_keep_the_connection(
    fuzz_socket: ClientConnection, frame: Any
) -> None:
    fuzz_socket.send(frame)
    kinds = _reply_kinds(fuzz_socket)
    if kinds and kinds[0] == "session":
        assert "done" in kinds or "error" in kinds
    fuzz_socket.ping().wait(10)  # the connection is alive


def test_after_the_fuzzing_the_socket_still_generates(fuzz_socket: ClientConnection) -> None:
    fuzz_socket.send(json.dumps({"type": "cancel"}))
    _reply_kinds(fuzz_socket)
    fuzz_socket.send(json.dumps({"type": "generate", "prompt": "recipe for", "max_tokens": 3}))
    kinds = _reply_kinds(fuzz_socket)
    while kinds and kinds[-1] not in ("done", "error"):
        kinds += _reply_kinds(fuzz_socket)
    assert kinds[-1] in ("done", "error")
