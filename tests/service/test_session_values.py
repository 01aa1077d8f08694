"""Sessions as values: signed state tokens, fork, rewind, peek, n choices, accounting.

Each behaviour runs on the real app with the memory store and with Redis; the state
tokens also cross two real server processes that share nothing but a secret.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import numpy as np
import pytest

from service.sessions import SessionState
from service.sessions.portable import seal
from tests.service.conftest import AppClient, generate

pytestmark = pytest.mark.anyio

# greedy, and never ending at the stop token: a turn that ended there leaves nothing to
# continue from without a new prompt
GREEDY = {"top_k": 1, "ignore_eos": True}
PROMPT = "recipe for lemon chicken |"
StartApp = Callable[..., Awaitable[AppClient]]


def error_of(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    message: str = error["message"]
    return message


# --- state tokens -----------------------------------------------------------------------


async def test_a_state_token_continues_exactly_like_the_session(any_app: AppClient) -> None:
    first = await generate(any_app, prompt=PROMPT, max_tokens=6, return_state=True, **GREEDY)
    token = first["state"]
    assert isinstance(token, str) and len(token) <= 2048
    by_session = await generate(any_app, session_id=first["session_id"], max_tokens=8, **GREEDY)
    by_token = await generate(any_app, state=token, max_tokens=8, **GREEDY)
    assert by_token["text"] == by_session["text"]
    assert by_token["session_id"] != first["session_id"]  # a new session of its own
    # only the pending token was fed: no history re-read
    assert by_token["usage"]["fed_tokens"] == 1
    assert by_token["usage"]["session_tokens"] == by_session["usage"]["session_tokens"]
    # the new session can be continued by id too
    again = await generate(any_app, session_id=by_token["session_id"], max_tokens=3, **GREEDY)
    assert again["usage"]["session_tokens"] == by_token["usage"]["session_tokens"] + 3


async def test_state_tokens_come_back_from_sse_websocket_and_completions(
    memory_app: AppClient,
) -> None:
    plain = await generate(memory_app, prompt=PROMPT, max_tokens=4, return_state=True, **GREEDY)
    async with memory_app.stream(
        "POST",
        "/v1/generate",
        json={"prompt": PROMPT, "max_tokens": 4, "stream": True, "return_state": True, **GREEDY},
    ) as response:
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    done = httpx.Response(200, content=lines[-1][6:]).json()
    assert done["type"] == "done" and done["state"]

    with await memory_app.websocket_connect("/v1/stream") as ws:
        ws.send_json({"type": "generate", "prompt": PROMPT, "max_tokens": 4, "return_state": True})
        while (event := ws.receive_json(timeout=30))["type"] != "done":
            assert event["type"] in ("session", "token")
        assert event["state"]

    completion = await memory_app.post(
        "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 4, "return_state": True, "top_k": 1},
    )
    choice = completion.json()["choices"][0]
    assert choice["state"]
    # every token holds the same greedy state: continuing from any gives the same words
    continued = {
        (await generate(memory_app, state=blob, max_tokens=5, **GREEDY))["text"]
        for blob in (plain["state"], done["state"], event["state"], choice["state"])
    }
    assert len(continued) == 1


async def test_bad_state_tokens_are_refused_with_a_reason(memory_app: AppClient) -> None:
    token = (await generate(memory_app, prompt=PROMPT, max_tokens=2, return_state=True))["state"]
    raw = bytearray(base64.urlsafe_b64decode(token))
    raw[-1] ^= 1  # one bit of the state
    tampered = base64.urlsafe_b64encode(bytes(raw)).decode()
    message = error_of(
        await memory_app.post("/v1/generate", json={"state": tampered}), 400, "invalid_state"
    )
    assert "signature" in message
    error_of(await memory_app.post("/v1/generate", json={"state": "%%%"}), 400, "invalid_state")
    both = await memory_app.post("/v1/generate", json={"state": token, "session_id": "abc"})
    assert both.status_code == 422 and both.json()["error"]["param"] == "state"


async def test_a_state_token_from_another_model_or_too_old_is_refused(
    start_app: StartApp,
) -> None:
    client = await start_app(state_secret="shared-secret", state_max_age_s=60)
    version = (await client.get("/v1/models")).json()["data"][0]["version"]
    state = SessionState.fresh(1, 32)  # the tiny model's shape
    state.pending = 5
    other = seal(state, b"shared-secret", "another-model")
    message = error_of(
        await client.post("/v1/generate", json={"state": other}), 400, "state_model_mismatch"
    )
    assert "another-model" in message
    old = seal(state, b"shared-secret", version, issued=time.time() - 3600)
    message = error_of(await client.post("/v1/generate", json={"state": old}), 400, "invalid_state")
    assert "60 s" in message
    fresh = seal(state, b"shared-secret", version)
    assert (await client.post("/v1/generate", json={"state": fresh, "max_tokens": 2})).is_success


def test_a_book_model_state_token_is_under_two_kibibytes() -> None:
    state = SessionState.fresh(1, 128, owner="k" * 16, model="simmer-lstm-" + "0" * 12)
    state.history = [state.snapshot()] * 8  # rewind points stay out of the token
    assert len(seal(state, b"secret", state.model)) <= 2048


# --- fork -----------------------------------------------------------------------------


async def test_a_fork_continues_like_its_source_and_is_independent(any_app: AppClient) -> None:
    first = await generate(any_app, prompt=PROMPT, max_tokens=5, **GREEDY)
    source = first["session_id"]
    forked = await any_app.post(f"/v1/sessions/{source}/fork")
    assert forked.status_code == 201
    info = forked.json()
    assert info["session_id"] != source
    assert info["tokens"] == first["usage"]["session_tokens"] and info["pending_token"]
    from_fork = await generate(any_app, session_id=info["session_id"], max_tokens=6, **GREEDY)
    assert from_fork["usage"]["fed_tokens"] == 1  # O(1): nothing re-read
    from_source = await generate(any_app, session_id=source, max_tokens=6, **GREEDY)
    assert from_fork["text"] == from_source["text"]
    # they have moved on separately: a sampled turn on one leaves the other as it was
    await generate(any_app, session_id=info["session_id"], max_tokens=4, seed=3)
    assert (await any_app.get(f"/v1/sessions/{source}")).json()["tokens"] == from_source["usage"][
        "session_tokens"
    ]


async def test_fork_rewind_and_peek_of_an_unknown_or_anothers_session_are_404(
    start_app: StartApp,
) -> None:
    client = await start_app(api_keys="key-one,key-two")
    one, two = ({"Authorization": f"Bearer {k}"} for k in ("key-one", "key-two"))
    response = await client.post(
        "/v1/generate", json={"prompt": PROMPT, "max_tokens": 2}, headers=one
    )
    session_id = response.json()["session_id"]
    for sid, headers in ((session_id, two), ("0" * 32, one)):
        for method, path, body in (
            ("POST", "fork", None),
            ("POST", "rewind", {"turns": 1}),
            ("GET", "next", None),
        ):
            answer = await client.request(
                method, f"/v1/sessions/{sid}/{path}", json=body, headers=headers
            )
            error_of(answer, 404, "session_not_found")
    assert (await client.post(f"/v1/sessions/{session_id}/fork", headers=one)).status_code == 201


# --- rewind ------------------------------------------------------------------------------


async def test_rewind_then_regenerate_gives_the_same_greedy_turn(any_app: AppClient) -> None:
    first = await generate(any_app, prompt=PROMPT, max_tokens=5, **GREEDY)
    session_id = first["session_id"]
    second = await generate(any_app, session_id=session_id, max_tokens=7, **GREEDY)
    info = (await any_app.get(f"/v1/sessions/{session_id}")).json()
    assert info["rewind_points"] == 2
    rewound = await any_app.post(f"/v1/sessions/{session_id}/rewind", json={"turns": 1})
    assert rewound.status_code == 200
    assert rewound.json()["tokens"] == first["usage"]["session_tokens"]
    assert rewound.json()["rewind_points"] == 1
    again = await generate(any_app, session_id=session_id, max_tokens=7, **GREEDY)
    assert again["text"] == second["text"]
    # two back: before the first call, an empty session again
    back = await any_app.post(f"/v1/sessions/{session_id}/rewind", json={"turns": 2})
    assert back.json()["tokens"] == 0 and back.json()["pending_token"] is False
    redo = await generate(any_app, session_id=session_id, prompt=PROMPT, max_tokens=5, **GREEDY)
    assert redo["text"] == first["text"]


async def test_rewinding_past_the_kept_calls_is_409_saying_how_many(start_app: StartApp) -> None:
    client = await start_app(session_history=2)
    session_id = (await generate(client, prompt=PROMPT, max_tokens=2))["session_id"]
    for _ in range(3):
        await generate(client, session_id=session_id, max_tokens=2)
    info = (await client.get(f"/v1/sessions/{session_id}")).json()
    assert info["rewind_points"] == 2  # the oldest two starts were forgotten
    message = error_of(
        await client.post(f"/v1/sessions/{session_id}/rewind", json={"turns": 3}),
        409,
        "rewind_too_far",
    )
    assert "go back 2 calls" in message and "last 2" in message
    bad = await client.post(f"/v1/sessions/{session_id}/rewind", json={"turns": 0})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "turns"
    assert (await client.get(f"/v1/sessions/{session_id}")).json() == info  # nothing lost


# --- peek -------------------------------------------------------------------------------


async def test_peek_shows_the_next_words_without_advancing(any_app: AppClient) -> None:
    first = await generate(any_app, prompt=PROMPT, max_tokens=3, **GREEDY)
    session_id = first["session_id"]
    peek = await any_app.get(f"/v1/sessions/{session_id}/next", params={"top": 4})
    assert peek.status_code == 200
    body = peek.json()
    assert body["session_id"] == session_id and body["temperature"] == 1.0
    assert body["tokens"] == first["usage"]["session_tokens"]
    top = body["top"]
    assert len(top) == 4
    assert [w["logprob"] for w in top] == sorted((w["logprob"] for w in top), reverse=True)
    assert all(np.isclose(w["prob"], np.exp(w["logprob"])) for w in top)
    assert sum(w["prob"] for w in top) <= 1.0 + 1e-6
    twice = await any_app.get(f"/v1/sessions/{session_id}/next", params={"top": 4})
    assert twice.json() == body
    info = (await any_app.get(f"/v1/sessions/{session_id}")).json()
    assert info["tokens"] == body["tokens"] and info["rewind_points"] == 1  # unchanged
    hot = await any_app.get(f"/v1/sessions/{session_id}/next", params={"top": 4, "temperature": 3})
    assert hot.json()["top"][0]["prob"] < top[0]["prob"]  # a flatter distribution
    step = await generate(any_app, session_id=session_id, max_tokens=1, logprobs=1, top_k=1)
    assert step["logprobs"][0]["id"] == top[0]["id"]
    assert np.isclose(step["logprobs"][0]["logprob"], top[0]["logprob"], atol=1e-5)


async def test_peek_of_an_empty_session_is_409_and_bad_parameters_422(
    memory_app: AppClient,
) -> None:
    session_id = (await memory_app.post("/v1/sessions", json={})).json()["session_id"]
    error_of(await memory_app.get(f"/v1/sessions/{session_id}/next"), 409, "session_empty")
    for params in ({"top": 0}, {"top": 10**6}, {"temperature": 0}, {"temperature": 1e9}):
        answer = await memory_app.get(f"/v1/sessions/{session_id}/next", params=params)
        assert answer.status_code in (400, 422), (params, answer.text)
        assert "error" in answer.json()


# --- n choices --------------------------------------------------------------------------


async def test_n_choices_each_have_a_session_and_seeded_choice_i_is_reproducible(
    any_app: AppClient,
) -> None:
    many = await generate(any_app, prompt=PROMPT, max_tokens=8, n=3, seed=11, ignore_eos=True)
    choices = many["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert len({c["session_id"] for c in choices}) == 3
    assert many["session_id"] == choices[0]["session_id"]
    for index, choice in enumerate(choices):
        alone = await generate(
            any_app, prompt=PROMPT, max_tokens=8, seed=11 + index, ignore_eos=True
        )
        assert choice["text"] == alone["text"]
        assert choice["usage"]["session_tokens"] == alone["usage"]["session_tokens"]
    # any choice can be continued
    more = await generate(any_app, session_id=choices[2]["session_id"], max_tokens=2)
    assert more["usage"]["fed_tokens"] == 1


async def test_n_choices_stream_over_sse_with_their_index(memory_app: AppClient) -> None:
    async with memory_app.stream(
        "POST",
        "/v1/generate",
        json={"prompt": PROMPT, "max_tokens": 5, "n": 2, "stream": True, "ignore_eos": True},
    ) as response:
        events = [
            httpx.Response(200, content=line[6:]).json()
            async for line in response.aiter_lines()
            if line.startswith("data: ")
        ]
    sessions = [e for e in events if e["type"] == "session"]
    assert [e["choice"] for e in sessions] == [0, 1]
    done = [e for e in events if e["type"] == "done"]
    assert sorted(e["choice"] for e in done) == [0, 1]
    for choice in (0, 1):
        tokens = [e for e in events if e["type"] == "token" and e["choice"] == choice]
        assert sum(e["count"] for e in tokens) == 5


async def test_n_out_of_bounds_is_422(memory_app: AppClient) -> None:
    for n in (0, 17):
        answer = await memory_app.post("/v1/generate", json={"prompt": PROMPT, "n": n})
        assert answer.status_code == 422 and answer.json()["error"]["param"] == "n"


# --- accounting ---------------------------------------------------------------------------


async def test_usage_shows_history_is_never_fed_again_and_resumes_are_counted(
    any_app: AppClient,
) -> None:
    def resumes(text: str, source: str) -> float:
        prefix = f'simmer_session_resume_total{{source="{source}"}} '
        return sum(
            float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)
        )

    store = "redis" if "redis" in (await any_app.get("/readyz")).json()["store"] else "memory"
    before = (await any_app.get("/metrics")).text
    first = await generate(any_app, prompt=PROMPT, max_tokens=10, ignore_eos=True)
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert first["usage"]["fed_tokens"] == prompt_tokens  # a new session: the prompt only
    assert first["usage"]["session_tokens"] == prompt_tokens + 10
    turn = await generate(
        any_app, session_id=first["session_id"], prompt="add salt .", max_tokens=10, ignore_eos=True
    )
    assert turn["usage"]["fed_tokens"] == 1 + turn["usage"]["prompt_tokens"]  # pending + new
    assert (
        turn["usage"]["session_tokens"]
        == first["usage"]["session_tokens"] + 10 + turn["usage"]["prompt_tokens"]
    )
    last = await generate(
        any_app, session_id=first["session_id"], max_tokens=3, ignore_eos=True, return_state=True
    )
    token = last["state"]
    await generate(any_app, state=token, max_tokens=2)
    after = (await any_app.get("/metrics")).text
    assert resumes(after, store) - resumes(before, store) == 2
    assert resumes(after, "state") - resumes(before, "state") == 1


# --- across real replicas -----------------------------------------------------------------


def test_two_replicas_sharing_a_secret_serve_one_conversation_round_robin(
    start_server: Any,
) -> None:
    """Two server processes with memory stores (no Redis, nothing shared but the secret)
    take turns on one conversation; it reads as one server's session would."""
    a = start_server(state_secret="round-robin-secret")
    b = start_server(state_secret="round-robin-secret")
    stranger = start_server(state_secret="another-secret")

    def post(server: Any, **body: Any) -> dict[str, Any]:
        response = httpx.post(f"{server.base_url}/v1/generate", json=body, timeout=30)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    turns: list[dict[str, Any]] = [
        {"prompt": PROMPT, "max_tokens": 6},
        {"max_tokens": 5},
        {"prompt": "stir .", "max_tokens": 4},
    ]
    # the reference: one session on one server
    reference = [post(a, **turns[0], **GREEDY)]
    for turn in turns[1:]:
        reference.append(post(a, session_id=reference[-1]["session_id"], **turn, **GREEDY))
    # round robin: each turn on the other replica, carried by the state token alone
    token = None
    for index, (turn, expected) in enumerate(zip(turns, reference, strict=True)):
        server = (a, b)[index % 2]
        extra: dict[str, Any] = {} if token is None else {"state": token}
        result = post(server, **turn, **extra, return_state=True, **GREEDY)
        assert result["text"] == expected["text"]
        assert result["usage"]["session_tokens"] == expected["usage"]["session_tokens"]
        token = result["state"]
    refused = httpx.post(f"{stranger.base_url}/v1/generate", json={"state": token}, timeout=30)
    assert refused.status_code == 400
    assert "signature" in refused.json()["error"]["message"]


# --- echo scoring -----------------------------------------------------------------------


async def test_echo_scores_a_text_as_generation_reported_it(any_app: AppClient) -> None:
    # echo scores with the model as it is: lift the default [UNK] ban from the generation
    # too, so the logprobs it reports are of that same distribution
    made = await generate(
        any_app,
        prompt=PROMPT,
        max_tokens=12,
        logprobs=2,
        seed=4,
        ignore_eos=True,
        logit_bias={"[UNK]": 0},
    )
    text = PROMPT + made["text"]
    scored = await generate(any_app, prompt=text, max_tokens=0, echo=True, logprobs=2)
    prompt = scored["prompt_logprobs"]
    assert prompt[0]["logprob"] is None and prompt[0]["top"] == []  # nothing before it
    generated = made["logprobs"]
    tail = prompt[-len(generated) :]
    assert [p["id"] for p in tail] == [g["id"] for g in generated]
    for p, g in zip(tail, generated, strict=True):
        assert np.isclose(p["logprob"], g["logprob"], atol=1e-4)
        assert [w["id"] for w in p["top"]] == [w["id"] for w in g["top"]]
    assert scored["usage"]["completion_tokens"] == 0
    assert scored["usage"]["session_tokens"] == len(prompt)
    # the scored text is the session's context: continuing it continues the recipe
    after = await generate(any_app, session_id=scored["session_id"], max_tokens=5, **GREEDY)
    direct = await generate(any_app, session_id=made["session_id"], max_tokens=5, **GREEDY)
    assert after["text"] == direct["text"]


async def test_echo_then_generate_and_max_tokens_zero_needs_echo(memory_app: AppClient) -> None:
    both = await generate(memory_app, prompt=PROMPT, max_tokens=4, echo=True, logprobs=1, **GREEDY)
    alone = await generate(memory_app, prompt=PROMPT, max_tokens=4, logprobs=1, **GREEDY)
    assert both["text"] == alone["text"]
    assert len(both["prompt_logprobs"]) == both["usage"]["prompt_tokens"]
    refused = await memory_app.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 0})
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "max_tokens"


async def test_openai_echo_with_max_tokens_zero_scores_the_prompt(memory_app: AppClient) -> None:
    import openai

    client = openai.AsyncOpenAI(
        base_url="http://testserver.local/v1",
        api_key="unused",
        max_retries=0,
        http_client=memory_app,  # type: ignore[arg-type]
    )
    made = await generate(
        memory_app,
        prompt=PROMPT,
        max_tokens=8,
        logprobs=1,
        ignore_eos=True,
        logit_bias={"[UNK]": 0},
    )
    text = PROMPT + made["text"]
    scored = await client.completions.create(
        model="simmer-lstm", prompt=text, echo=True, logprobs=1, max_tokens=0
    )
    choice = scored.choices[0]
    assert choice.text == text
    assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
    assert choice.logprobs.token_logprobs[0] is None
    tail = choice.logprobs.token_logprobs[-8:]
    assert np.allclose(tail, [g["logprob"] for g in made["logprobs"]], atol=1e-4)
    offsets = choice.logprobs.text_offset or []
    assert offsets == sorted(offsets) and text[offsets[1] :].startswith("for")
    stream = await client.completions.create(
        model="simmer-lstm",
        prompt=PROMPT,
        echo=True,
        max_tokens=3,
        stream=True,
        extra_body={"top_k": 1},
    )
    pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices]
    assert pieces[0] == PROMPT and len("".join(pieces)) > len(PROMPT)
    many = await client.completions.create(
        model="simmer-lstm", prompt=PROMPT, n=3, best_of=5, max_tokens=6, seed=2
    )
    assert len(many.choices) == 3
    assert len({c.model_extra["session_id"] for c in many.choices if c.model_extra}) == 3


async def test_echo_on_the_websocket_and_state_tokens_on_chat(memory_app: AppClient) -> None:
    with await memory_app.websocket_connect("/v1/stream") as ws:
        ws.send_json({"type": "generate", "prompt": PROMPT, "max_tokens": 2, "echo": True})
        session = ws.receive_json(timeout=30)
        assert session["type"] == "session"
        assert [p["id"] for p in session["prompt_logprobs"]][:2] == [
            p["id"]
            for p in (await generate(memory_app, prompt=PROMPT, max_tokens=0, echo=True))[
                "prompt_logprobs"
            ][:2]
        ]
        while ws.receive_json(timeout=30)["type"] != "done":
            pass
    chat = await memory_app.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "lemon chicken"}],
            "max_tokens": 3,
            "return_state": True,
        },
    )
    assert chat.status_code == 200, chat.text
    token = chat.json()["state"]
    more = await generate(memory_app, state=token, max_tokens=2)
    assert more["usage"]["fed_tokens"] == 1


async def test_best_of_never_deletes_the_session_it_continues(memory_app: AppClient) -> None:
    first = await generate(memory_app, prompt=PROMPT, max_tokens=3, **GREEDY)
    session_id = first["session_id"]
    for seed in range(3):
        answer = await memory_app.post(
            "/v1/completions",
            json={
                "session_id": session_id,
                "prompt": "",
                "best_of": 4,
                "max_tokens": 4,
                "seed": seed,
            },
        )
        assert answer.status_code == 200, answer.text
        assert (await memory_app.get(f"/v1/sessions/{session_id}")).status_code == 200
    kept = answer.json()["choices"][0]["session_id"]
    assert (await memory_app.get(f"/v1/sessions/{kept}")).status_code == 200
