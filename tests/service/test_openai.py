"""The OpenAI surface against a real server with the official `openai` client: logit_bias,
penalties, chat completions, the vocabulary route, and every OpenAI field simmer refuses.

One real server (`python -m service` on a free port, the memory store, the tiny bundle)
serves the whole module; the client talks to it over loopback like any other client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from websockets.sync.client import connect

from tests.conftest import ServerProcess

MODEL = "simmer-lstm"
GREEDY = {"top_k": 1}


@pytest.fixture(scope="module")
def client(memory_server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{memory_server.base_url}/v1", api_key="unused", max_retries=0, timeout=60
    ) as oai:
        yield oai


@pytest.fixture(scope="module")
def vocab(memory_server: ServerProcess) -> list[str]:
    response = httpx.get(f"{memory_server.base_url}/v1/models/{MODEL}/vocab", timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == MODEL and body["size"] == len(body["words"])
    assert (body["stop_token_id"], body["unk_token_id"]) == (0, 1)
    words: list[str] = body["words"]
    return words


def _tokens(completion: Any) -> list[str]:
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    tokens: list[str] = logprobs.tokens
    return tokens


def repetition_rate(words: list[str]) -> float:
    """The share of generated tokens that repeat a word generated earlier in the sample."""
    return 1.0 - len(set(words)) / len(words)


# --- the vocabulary ------------------------------------------------------------------------


def test_the_vocab_route_numbers_the_words_and_knows_only_this_model(
    memory_server: ServerProcess, vocab: list[str]
) -> None:
    assert vocab[:2] == ["", "[UNK]"] and len(set(vocab)) == len(vocab) == 500
    other = httpx.get(f"{memory_server.base_url}/v1/models/gpt-4/vocab", timeout=10)
    assert other.status_code == 404
    assert other.json()["error"] == {
        "code": "model_not_found",
        "message": "model 'gpt-4' is not served here",
        "param": "model_id",
    }


# --- logit_bias and penalties ----------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_banned_ids_never_appear_in_200_tokens(
    client: openai.OpenAI, vocab: list[str], temperature: float
) -> None:
    free = client.completions.create(
        model=MODEL,
        prompt="recipe for beef stew |",
        max_tokens=200,
        temperature=temperature,
        seed=1,
        logprobs=1,
        extra_body={"ignore_eos": True},
    )
    # ban the ten words it used most
    counts: dict[str, int] = {}
    for word in _tokens(free):
        counts[word] = counts.get(word, 0) + 1
    banned = sorted(counts, key=counts.__getitem__, reverse=True)[:10]
    banned_ids = {str(vocab.index(word)): -100 for word in banned}
    biased = client.completions.create(
        model=MODEL,
        prompt="recipe for beef stew |",
        max_tokens=200,
        temperature=temperature,
        seed=1,
        logprobs=3,
        logit_bias=banned_ids,
        extra_body={"ignore_eos": True},
    )
    tokens = _tokens(biased)
    assert len(tokens) == 200
    assert not set(tokens) & set(banned)
    logprobs = biased.choices[0].logprobs
    assert logprobs is not None and logprobs.top_logprobs is not None
    for top in logprobs.top_logprobs:
        assert not set(top) & set(banned)  # the biased distribution's candidates


def test_a_positive_bias_makes_a_word_near_certain(client: openai.OpenAI, vocab: list[str]) -> None:
    salt = vocab.index("salt")
    completion = client.completions.create(
        model=MODEL,
        prompt="recipe for soup |",
        max_tokens=20,
        logprobs=1,
        logit_bias={str(salt): 100},
    )
    assert set(_tokens(completion)) == {"salt"}
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert min(logprobs.token_logprobs) > -1e-3  # the biased distribution's logprobs


def test_penalties_lower_the_repetition_rate_with_the_same_seed(client: openai.OpenAI) -> None:
    rates: dict[float, list[float]] = {0.0: [], 2.0: []}
    for seed in (1, 2, 3):
        for penalty, found in rates.items():
            completion = client.completions.create(
                model=MODEL,
                prompt="recipe for chicken soup |",
                max_tokens=150,
                temperature=0.3,
                seed=seed,
                logprobs=1,
                presence_penalty=penalty,
                frequency_penalty=penalty,
                extra_body={"ignore_eos": True},
            )
            tokens = _tokens(completion)
            assert len(tokens) == 150
            found.append(repetition_rate(tokens))
    for plain, penalised in zip(rates[0.0], rates[2.0], strict=True):
        assert penalised < plain - 0.1, rates


def test_the_unk_ban_holds_by_default_and_a_request_may_lift_it(client: openai.OpenAI) -> None:
    def unks(**bias: Any) -> int:
        completion = client.completions.create(
            model=MODEL,
            prompt="recipe for [UNK] |",
            max_tokens=200,
            temperature=1.0,
            seed=4,
            logprobs=1,
            extra_body={"ignore_eos": True, **bias},
        )
        return _tokens(completion).count("[UNK]")

    assert unks() == 0
    assert unks(logit_bias={"1": 0}) > 0  # the tiny model says [UNK] often when it may


def test_generate_and_the_websocket_take_words_as_logit_bias_keys(
    memory_server: ServerProcess,
) -> None:
    body = {
        "prompt": "recipe for soup |",
        "max_tokens": 100,
        "ignore_eos": True,
        "logprobs": 1,
        "seed": 3,
        "logit_bias": {".": -100, ",": -100, "salt": 4},
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
    }
    response = httpx.post(f"{memory_server.base_url}/v1/generate", json=body, timeout=30)
    assert response.status_code == 200, response.text
    words = [step["token"] for step in response.json()["logprobs"]]
    assert len(words) == 100 and not {".", ","} & set(words) and "salt" in words
    with connect(memory_server.ws_url) as ws:
        ws.send(json.dumps({"type": "generate", **body}))
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] not in ("done", "error"):
            events.append(json.loads(ws.recv(timeout=30)))
        assert events[-1]["type"] == "done", events[-1]
        streamed = [s["token"] for e in events if e["type"] == "token" for s in e["logprobs"]]
        assert streamed == words  # the same seed, the same tokens
        ws.send(json.dumps({"type": "generate", "prompt": "x", "logit_bias": {"saffron": 1}}))
        error = json.loads(ws.recv(timeout=30))
        assert (error["type"], error["param"]) == ("error", "logit_bias")
    unknown = httpx.post(
        f"{memory_server.base_url}/v1/generate",
        json={"prompt": "x", "logit_bias": {"saffron": 1}},
        timeout=30,
    )
    assert unknown.status_code == 422 and unknown.json()["error"]["param"] == "logit_bias"


@pytest.mark.parametrize(
    ("bias", "param"),
    [
        ({"500": 1}, "logit_bias"),  # past the vocabulary
        ({"salt": 1}, "logit_bias"),  # OpenAI's keys are ids
        ({"3": 101}, "logit_bias"),
        ({str(i): 1 for i in range(301)}, "logit_bias"),
    ],
)
def test_bad_logit_bias_is_422_naming_it(
    client: openai.OpenAI, bias: dict[str, int], param: str
) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, logit_bias=bias)
    assert caught.value.param == param


# --- chat completions ----------------------------------------------------------------------


def _chat(client: openai.OpenAI, content: str = "apple pie", **options: Any) -> Any:
    messages = options.pop("messages", [{"role": "user", "content": content}])
    return client.chat.completions.create(model=MODEL, messages=messages, **options)


def test_chat_answers_the_dish_through_the_recipe_template(
    client: openai.OpenAI, memory_server: ServerProcess
) -> None:
    chat = _chat(client, "Apple Pie", max_tokens=12, extra_body=GREEDY)
    choice = chat.choices[0]
    assert chat.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("length", "stop")
    assert chat.usage is not None and chat.usage.prompt_tokens == 5  # recipe for apple pie |
    assert chat.model_extra and chat.model_extra["session_id"]
    completion = client.completions.create(
        model=MODEL, prompt="recipe for apple pie |", max_tokens=12, extra_body=GREEDY
    )
    assert choice.message.content == completion.choices[0].text


def test_chat_ignores_system_and_assistant_messages(client: openai.OpenAI) -> None:
    history = [
        {"role": "system", "content": "You are a pastry chef."},
        {"role": "user", "content": "soup"},
        {"role": "assistant", "content": "stir the soup"},
        {"role": "user", "content": [{"type": "text", "text": "apple pie"}]},
    ]
    with_history = _chat(client, messages=history, max_tokens=12, extra_body=GREEDY)
    alone = _chat(client, max_tokens=12, extra_body=GREEDY)
    assert with_history.choices[0].message.content == alone.choices[0].message.content


def test_chat_with_a_session_feeds_the_message_as_it_is(client: openai.OpenAI) -> None:
    first = _chat(client, max_tokens=6, extra_body=GREEDY)
    session_id = first.model_extra["session_id"]
    more = _chat(client, "", max_tokens=6, extra_body={**GREEDY, "session_id": session_id})
    assert more.model_extra["session_id"] == session_id
    whole = _chat(client, max_tokens=12, extra_body=GREEDY)
    text = first.choices[0].message.content + more.choices[0].message.content
    assert text == whole.choices[0].message.content


def test_chat_streams_chunks_then_usage_then_done(client: openai.OpenAI) -> None:
    stream = _chat(
        client,
        max_completion_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=GREEDY,
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("length", "stop") and not any(finishes[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == 10
    plain = _chat(client, max_tokens=10, extra_body=GREEDY)
    assert text == plain.choices[0].message.content


def test_a_chat_stream_ends_with_data_done(memory_server: ServerProcess) -> None:
    body = {"messages": [{"role": "user", "content": "cake"}], "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", f"{memory_server.base_url}/v1/chat/completions", json=body, timeout=30
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(line[6:]) for line in lines[:-1])


def test_chat_logprobs_come_in_the_chat_format(client: openai.OpenAI) -> None:
    chat = _chat(
        client,
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
        logit_bias={"1": -100},
        presence_penalty=1.0,
        frequency_penalty=1.0,
        seed=2,
    )
    logprobs = chat.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None and len(logprobs.content) == 5
    for entry in logprobs.content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3 and "[UNK]" not in {t.token for t in entry.top_logprobs}
    text = "".join(e.token for e in logprobs.content)
    assert text.replace(" ", "") == (chat.choices[0].message.content or "").replace(" ", "")


# --- nothing OpenAI defines is accepted and ignored -------------------------------------------

TOOL = {"type": "function", "function": {"name": "weigh", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [TOOL]),
        ("tool_choice", "required"),
        ("parallel_tool_calls", False),
        ("functions", [{"name": "weigh"}]),
        ("function_call", "auto"),
        ("response_format", {"type": "json_object"}),
        ("audio", {"voice": "alloy", "format": "mp3"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("metadata", {"k": "v"}),
        ("store", True),
        ("service_tier", "flex"),
        ("reasoning_effort", "low"),
        ("verbosity", "high"),
        ("web_search_options", {}),
        ("prompt_cache_retention", "24h"),
        ("n", 2),
    ],
)
def test_each_chat_field_simmer_cannot_honour_is_422_naming_it(
    client: openai.OpenAI, field: str, value: Any
) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        _chat(client, max_tokens=2, **{field: value})
    assert caught.value.param == field


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "tool", "content": "4 g", "tool_call_id": "c1"}], "messages.0.role"),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "function", "name": "weigh", "content": "4 g"},
            ],
            "messages.1.role",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages.0.content.0.type",
        ),
    ],
)
def test_tool_messages_and_non_text_parts_are_422_naming_them(
    client: openai.OpenAI, messages: list[dict[str, Any]], param: str
) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        _chat(client, messages=messages, max_tokens=2)
    assert caught.value.param == param


def test_completions_refuse_suffix_and_stream_options_without_a_stream(
    client: openai.OpenAI,
) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, suffix="done")
    assert caught.value.param == "suffix"
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.completions.create(
            model=MODEL, prompt="x", max_tokens=2, stream_options={"include_usage": True}
        )
    assert caught.value.param == "stream_options"


def test_user_and_fields_openai_does_not_define_are_accepted(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL, prompt="x", max_tokens=2, user="cook-7", extra_body={"surprise": 1}
    )
    assert completion.choices[0].text is not None
    chat = _chat(
        client,
        max_tokens=2,
        user="cook-7",
        safety_identifier="h-1",
        prompt_cache_key="k",
        tool_choice="none",
        store=False,
        extra_body={"surprise": {"nested": True}},
    )
    assert chat.choices[0].message.content is not None


# --- the OpenAPI document shows the new bounds ------------------------------------------------


def test_the_openapi_document_shows_the_bounds_of_the_new_fields(
    memory_server: ServerProcess,
) -> None:
    doc = httpx.get(f"{memory_server.base_url}/schema/openapi.json", timeout=10).json()
    schemas = doc["components"]["schemas"]
    for model in ("GenerateRequest", "CompletionRequest", "ChatCompletionRequest"):
        props = schemas[model]["properties"]
        (bias,) = [b for b in props["logit_bias"]["oneOf"] if b.get("type") == "object"]
        assert bias["maxProperties"] == 300
        assert bias["additionalProperties"]["minimum"] == -100
        assert bias["additionalProperties"]["maximum"] == 100
        assert bias["propertyNames"]["maxLength"] == 64
        for penalty in ("presence_penalty", "frequency_penalty"):
            (number,) = [b for b in props[penalty]["oneOf"] if b.get("type") == "number"]
            assert (number["minimum"], number["maximum"]) == (-2, 2)
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["messages"]["maxItems"] == 256
    (top,) = [b for b in chat["top_logprobs"]["oneOf"] if b.get("type") == "integer"]
    assert top["maximum"] == 20  # the server's max_logprobs
    post = doc["paths"]["/v1/chat/completions"]["post"]
    assert "text/event-stream" in post["responses"]["200"]["content"]
