"""The HTTP, SSE, WebSocket and OpenAI API of the real app, with real clients.

Most tests run the app from `create_app` in this process (tests/service/conftest.py),
with the memory store, the Redis store on the test database, or both. A test that needs
a client to leave a live stream, which the in-process client cannot do, starts the
real server on a real port.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
import openai
import pytest
from litestar.testing import WebSocketTestSession

from tests.conftest import ServerProcess
from tests.service.conftest import AppClient, generate

pytestmark = pytest.mark.anyio

GREEDY = {"top_k": 1}
StartApp = Callable[..., Awaitable[AppClient]]


def generate_on(server: ServerProcess, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{server.base_url}/v1/generate", json=body, timeout=30)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def sse_events(client: AppClient, **body: Any) -> list[dict[str, Any]]:
    events = []
    async with client.stream(
        "POST", "/v1/generate", json={**body, "stream": True}, timeout=30
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


async def connect(client: AppClient) -> WebSocketTestSession:
    return await client.websocket_connect("/v1/stream")


def ws_until_done(ws: WebSocketTestSession) -> list[dict[str, Any]]:
    events = []
    while True:
        event = json.loads(ws.receive_text(timeout=30))
        events.append(event)
        if event["type"] in ("done", "error"):
            return events


# --- JSON ---------------------------------------------------------------------------------


async def test_generate_returns_text_session_finish_reason_and_usage(any_app: AppClient) -> None:
    body = await generate(any_app, prompt="recipe for apple pie |", max_tokens=12, **GREEDY)
    assert len(body["session_id"]) == 32
    assert body["finish_reason"] in ("length", "eos")
    assert body["usage"]["prompt_tokens"] == 5
    assert 1 <= body["usage"]["completion_tokens"] <= 12
    assert body["usage"]["total_tokens"] == 5 + body["usage"]["completion_tokens"]
    assert body["text"].strip()


async def test_twenty_greedy_tokens_equal_ten_then_ten_more(any_app: AppClient) -> None:
    whole = await generate(any_app, prompt="recipe for roast chicken |", max_tokens=20, **GREEDY)
    first = await generate(any_app, prompt="recipe for roast chicken |", max_tokens=10, **GREEDY)
    second = await generate(any_app, session_id=first["session_id"], max_tokens=10, **GREEDY)
    assert whole["usage"]["completion_tokens"] == 20, (
        "the tiny model stopped early; pick a longer prompt"
    )
    assert first["text"] + second["text"] == whole["text"]
    assert second["session_id"] == first["session_id"]
    assert second["usage"]["prompt_tokens"] == 0


async def test_prompt_with_session_id_is_appended_to_the_context(any_app: AppClient) -> None:
    first = await generate(any_app, prompt="recipe for lemon tart |", max_tokens=8, **GREEDY)
    continued = await generate(
        any_app, session_id=first["session_id"], prompt=" preheat oven", max_tokens=8, **GREEDY
    )
    fresh = await generate(
        any_app,
        prompt="recipe for lemon tart |" + first["text"] + " preheat oven",
        max_tokens=8,
        **GREEDY,
    )
    assert continued["text"] == fresh["text"]
    info = (await any_app.get(f"/v1/sessions/{first['session_id']}")).json()
    assert (
        info["tokens"]
        == 5 + first["usage"]["completion_tokens"] + 2 + continued["usage"]["completion_tokens"]
    )


async def test_seeded_sampling_is_reproducible(memory_app: AppClient) -> None:
    a = await generate(
        memory_app, prompt="recipe for soup |", max_tokens=15, seed=7, temperature=1.0
    )
    b = await generate(
        memory_app, prompt="recipe for soup |", max_tokens=15, seed=7, temperature=1.0
    )
    c = await generate(
        memory_app, prompt="recipe for soup |", max_tokens=15, seed=8, temperature=1.0
    )
    assert a["text"] == b["text"]
    assert a["text"] != c["text"]


async def test_logprobs_give_the_top_words_at_each_step(memory_app: AppClient) -> None:
    body = await generate(memory_app, prompt="recipe for", max_tokens=4, logprobs=5, **GREEDY)
    steps = body["logprobs"]
    assert len(steps) == body["usage"]["completion_tokens"]
    for step in steps:
        probs = [w["prob"] for w in step["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True)
        assert step["top"][0]["token"] == step["token"]  # greedy takes the most likely word
        assert 0 < sum(probs) <= 1.0 + 1e-6


async def test_stop_string_ends_generation_and_is_not_returned(memory_app: AppClient) -> None:
    # sampled, not greedy: the tiny model's greedy text can be one word over and over
    drawn = {"seed": 3, "ignore_eos": True}
    free = await generate(memory_app, prompt="recipe for bread |", max_tokens=30, **drawn)
    words = free["text"].split()
    assert len(set(words)) >= 4
    stop = " " + words[2]
    body = await generate(
        memory_app, prompt="recipe for bread |", max_tokens=30, stop=[stop], **drawn
    )
    assert body["finish_reason"] == "stop"
    assert body["text"] == free["text"][: free["text"].index(stop)]


async def test_session_routes_create_read_delete(any_app: AppClient) -> None:
    created = await any_app.post("/v1/sessions", json={})
    assert created.status_code == 201
    session_id = created.json()["session_id"]
    info = (await any_app.get(f"/v1/sessions/{session_id}")).json()
    assert info["tokens"] == 0 and info["pending_token"] is False
    await generate(any_app, session_id=session_id, prompt="recipe for rice |", max_tokens=3)
    info = (await any_app.get(f"/v1/sessions/{session_id}")).json()
    assert info["tokens"] >= 5
    assert (await any_app.delete(f"/v1/sessions/{session_id}")).status_code == 204
    missing = await any_app.get(f"/v1/sessions/{session_id}")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "session_not_found"


# --- SSE ----------------------------------------------------------------------------------


async def test_sse_streams_token_events_then_done(memory_app: AppClient) -> None:
    events = await sse_events(memory_app, prompt="recipe for pancakes |", max_tokens=10, **GREEDY)
    assert events[0]["type"] == "session"
    tokens = [e for e in events if e["type"] == "token"]
    done = events[-1]
    assert done["type"] == "done"
    assert sum(e.get("count", 1) for e in tokens) == done["usage"]["completion_tokens"]
    assert [e["index"] for e in tokens] == sorted(e["index"] for e in tokens)
    plain = await generate(memory_app, prompt="recipe for pancakes |", max_tokens=10, **GREEDY)
    assert "".join(e["text"] for e in tokens) == plain["text"]


# --- WebSocket -----------------------------------------------------------------------------


async def test_websocket_streams_and_a_second_message_continues_the_session(
    any_app: AppClient,
) -> None:
    whole = await generate(any_app, prompt="recipe for fish |", max_tokens=12, **GREEDY)
    with await connect(any_app) as ws:
        ws.send(
            json.dumps(
                {"type": "generate", "prompt": "recipe for fish |", "max_tokens": 6, **GREEDY}
            )
        )
        first = ws_until_done(ws)
        ws.send(json.dumps({"type": "generate", "max_tokens": 6, **GREEDY}))
        second = ws_until_done(ws)
    assert first[0]["type"] == "session" and second[0]["type"] == "session"
    assert first[0]["session_id"] == second[0]["session_id"]
    text = "".join(e["text"] for e in first + second if e["type"] == "token")
    assert text == whole["text"]
    assert second[-1]["usage"]["completion_tokens"] == 6


async def test_websocket_cancel_stops_the_generation(memory_app: AppClient) -> None:
    with await connect(memory_app) as ws:
        ws.send(
            json.dumps(
                {
                    "type": "generate",
                    "prompt": "recipe for stew |",
                    "max_tokens": 1000,
                    "ignore_eos": True,
                }
            )
        )
        seen: list[dict[str, Any]] = []
        while len([e for e in seen if e["type"] == "token"]) < 3:
            seen.append(json.loads(ws.receive_text(timeout=30)))
        ws.send(json.dumps({"type": "cancel"}))
        rest = ws_until_done(ws)
        done = rest[-1]
        assert done["type"] == "done"
        assert done["finish_reason"] == "cancelled"
        assert done["usage"]["completion_tokens"] < 1000
        streamed = sum(e["count"] for e in seen + rest if e["type"] == "token")
        assert streamed == done["usage"]["completion_tokens"]
        # the connection and its session carry on after a cancel
        ws.send(json.dumps({"type": "generate", "max_tokens": 3, "ignore_eos": True}))
        after = ws_until_done(ws)
        assert after[0]["session_id"] == seen[0]["session_id"]
        assert after[-1]["usage"]["completion_tokens"] == 3


async def test_websocket_bad_messages_get_error_events_and_keep_the_connection(
    memory_app: AppClient,
) -> None:
    with await connect(memory_app) as ws:
        ws.send("{not json")
        assert json.loads(ws.receive_text(timeout=10))["code"] == "invalid_json"
        ws.send_bytes(b"\x00\x01binary")
        assert json.loads(ws.receive_text(timeout=10))["code"] == "invalid_message"
        ws.send(json.dumps({"type": "generate", "max_tokens": "many"}))
        error = json.loads(ws.receive_text(timeout=10))
        assert error["code"] == "invalid_request" and error["param"] == "max_tokens"
        ws.send(json.dumps({"type": "dance"}))
        assert json.loads(ws.receive_text(timeout=10))["type"] == "error"
        ws.send(json.dumps({"type": "generate", "prompt": "x" * 70_000}))
        assert json.loads(ws.receive_text(timeout=10))["code"] == "message_too_large"
        ws.send(json.dumps({"type": "generate", "prompt": "recipe for", "max_tokens": 2}))
        assert ws_until_done(ws)[-1]["type"] == "done"


# --- OpenAI --------------------------------------------------------------------------------


@pytest.fixture
def oai(memory_app: AppClient) -> openai.AsyncOpenAI:
    """The OpenAI client over the in-process app. Not closed here: closing it would close
    memory_app's test client, which its own fixture closes."""
    return openai.AsyncOpenAI(
        base_url="http://testserver.local/v1",
        api_key="unused",
        max_retries=0,
        # typed as httpx2's client, but openai accepts an httpx one, as the test client is
        http_client=memory_app,  # type: ignore[arg-type]
    )


async def test_openai_client_lists_the_model(oai: openai.AsyncOpenAI) -> None:
    models = await oai.models.list()
    assert [m.id for m in models.data] == ["simmer-lstm"]


async def test_models_entry_tells_clients_the_limits(start_app: StartApp) -> None:
    client = await start_app(max_new_tokens=77, max_logprobs=4)
    entry = (await client.get("/v1/models")).json()["data"][0]
    assert entry["limits"]["max_new_tokens"] == 77
    assert entry["limits"]["max_logprobs"] == 4
    too_many = await client.post("/v1/generate", json={"prompt": "x", "max_tokens": 78})
    assert too_many.status_code == 422


async def test_openai_client_completion_and_session_continuation(oai: openai.AsyncOpenAI) -> None:
    first = await oai.completions.create(
        model="simmer-lstm", prompt="recipe for beef stew |", max_tokens=6, extra_body={"top_k": 1}
    )
    assert first.choices[0].finish_reason in ("length", "stop")
    assert first.usage is not None and first.usage.prompt_tokens == 5
    session_id = first.model_extra["session_id"] if first.model_extra else None
    assert session_id
    whole = await oai.completions.create(
        model="simmer-lstm", prompt="recipe for beef stew |", max_tokens=12, extra_body={"top_k": 1}
    )
    more = await oai.completions.create(
        model="simmer-lstm",
        prompt="",
        max_tokens=6,
        extra_body={"session_id": session_id, "top_k": 1, "unknown": 1},
    )
    assert first.choices[0].text + more.choices[0].text == whole.choices[0].text


async def test_openai_client_streaming(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.completions.create(
        model="simmer-lstm",
        prompt="recipe for cake |",
        max_tokens=8,
        stream=True,
        extra_body={"top_k": 1},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    plain = await oai.completions.create(
        model="simmer-lstm", prompt="recipe for cake |", max_tokens=8, extra_body={"top_k": 1}
    )
    assert text == plain.choices[0].text


async def test_openai_errors_reach_the_client_as_api_errors(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await oai.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        await oai.completions.create(model="simmer-lstm", prompt="hi", max_tokens=100_000)


# --- errors --------------------------------------------------------------------------------


def _error(response: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 100_000}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_k": -2}, "top_k"),
        ({"prompt": "x", "surprise": True}, "surprise"),
        ({"prompt": 12}, "prompt"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
async def test_invalid_fields_are_422_naming_the_field(
    memory_app: AppClient, body: dict[str, Any], param: str
) -> None:
    _error(
        await memory_app.post("/v1/generate", json=body),
        422,
        "invalid_request",
        param,
    )


async def test_prompt_over_the_limit_is_422(start_app: StartApp) -> None:
    client = await start_app(max_prompt_tokens=8)
    response = await client.post("/v1/generate", json={"prompt": "a b c d e f g h i j"})
    _error(response, 422, "invalid_request", "prompt")


async def test_unknown_session_is_404(any_app: AppClient) -> None:
    response = await any_app.post("/v1/generate", json={"session_id": "0" * 32, "max_tokens": 2})
    _error(response, 404, "session_not_found", "session_id")


async def test_empty_prompt_for_a_new_session_is_422(memory_app: AppClient) -> None:
    response = await memory_app.post("/v1/generate", json={"prompt": "", "max_tokens": 2})
    _error(response, 422, "invalid_request", "prompt")


async def test_malformed_json_is_400_with_the_error_shape(memory_app: AppClient) -> None:
    response = await memory_app.post(
        "/v1/generate",
        content=b"{nope",
        headers={"content-type": "application/json"},
    )
    _error(response, 400, "bad_request")


async def test_expired_session_is_404_saying_it_expired(start_app: StartApp) -> None:
    client = await start_app(session_ttl_s=0.5)
    session_id = (await generate(client, prompt="recipe for", max_tokens=2))["session_id"]
    await anyio.sleep(1.2)
    response = await client.post("/v1/generate", json={"session_id": session_id, "max_tokens": 2})
    _error(response, 404, "session_not_found", "session_id")
    assert "expired" in response.json()["error"]["message"]


async def test_readiness_reports_model_and_provider(memory_app: AppClient) -> None:
    ready = await memory_app.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["provider"] == "CPUExecutionProvider"
    assert (await memory_app.get("/healthz")).json() == {"status": "ok"}


async def test_openapi_document_describes_the_api(memory_app: AppClient) -> None:
    doc = (await memory_app.get("/schema/openapi.json")).json()
    for path in ("/v1/generate", "/v1/completions", "/v1/models", "/v1/sessions"):
        assert path in doc["paths"]
    assert (await memory_app.get("/schema")).status_code == 200


# --- on a real server: the client must leave a live stream --------------------------------
# The in-process client returns a response only once the app has finished it, so a client
# that reads a few events of a million-token stream and hangs up needs a real socket.


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_two_generations_at_once_on_one_session_is_409(
    start_server: Any, clean_redis: str, store: str
) -> None:
    server = start_server(store=store, redis_url=clean_redis, max_new_tokens="1000000")
    session_id = generate_on(server, prompt="recipe for", max_tokens=1)["session_id"]
    started = threading.Event()
    enough = threading.Event()
    results: list[dict[str, Any]] = []

    def long_stream() -> None:
        with httpx.stream(
            "POST",
            f"{server.base_url}/v1/generate",
            json={
                "session_id": session_id,
                "max_tokens": 1_000_000,
                "stream": True,
                "ignore_eos": True,
            },
            timeout=60,
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    started.set()
                    results.append(json.loads(line[6:]))
                if enough.is_set():
                    break  # the client leaves: its generation stops and the session is saved

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(30)
    second = httpx.post(
        f"{server.base_url}/v1/generate", json={"session_id": session_id, "max_tokens": 2}
    )
    deleting = httpx.delete(f"{server.base_url}/v1/sessions/{session_id}")
    enough.set()
    thread.join(60)
    _error(second, 409, "session_busy", "session_id")
    _error(deleting, 409, "session_busy", "session_id")
    assert results[-1]["type"] == "token"  # cut off long before its million tokens
    # the session survived the refused requests and is usable again once it is released
    deadline = time.monotonic() + 10
    while True:
        response = httpx.post(
            f"{server.base_url}/v1/generate", json={"session_id": session_id, "max_tokens": 2}
        )
        if response.status_code != 409 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert response.status_code == 200, response.text
    assert response.json()["session_id"] == session_id


@pytest.mark.parametrize("access_log", [False, True])
def test_the_access_log_has_a_line_per_request_and_connection_only_when_asked(
    start_server: Any, access_log: bool
) -> None:
    from websockets.sync.client import connect

    server = start_server(access_log=str(access_log).lower())
    assert httpx.get(f"{server.base_url}/v1/models").status_code == 200
    with connect(server.ws_url) as ws:
        ws.send(json.dumps({"type": "generate", "prompt": "recipe for", "max_tokens": 1}))
        while json.loads(ws.recv(timeout=30))["type"] != "done":
            pass
    log = server.log()
    assert ('"WebSocket /v1/stream" [accepted]' in log) is access_log
    assert ("connection open" in log) is access_log  # the websockets library's own line
    assert ('"GET /v1/models HTTP/1.1" 200' in log) is access_log
    assert "Uvicorn running on" in log  # the server's own lines stay either way
