"""Wire models become engine parameters: logit_bias keys, the [UNK] ban, penalties, the
chat template and the OpenAI fields that are refused."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.engine.params import BAN
from service.errors import InvalidRequest, NotReady
from service.protocol import (
    CHAT_REFUSED,
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    Limits,
    SamplingFields,
)
from simmer.tokenizer import PAD, UNK, UNK_ID, Tokenizer

TOKENIZER = Tokenizer([PAD, UNK, "salt", "1", ".", "pepper", "olive", "oil"])
LIMITS = Limits(max_new_tokens=64, max_logprobs=5, default_max_tokens=8, tokenizer=TOKENIZER)
BAN_UNK = Limits(
    max_new_tokens=64, max_logprobs=5, default_max_tokens=8, ban_unk=True, tokenizer=TOKENIZER
)


def _bias(body: dict[str, Any], limits: Limits = LIMITS) -> dict[int, float]:
    fields = SamplingFields.model_validate({"prompt": "salt", **body})
    return dict(fields.to_generation(limits).sampling.logit_bias)


def _refused(call: Any) -> str | None:
    with pytest.raises(InvalidRequest) as caught:
        call()
    return caught.value.param


def test_logit_bias_keys_are_ids_or_words_of_the_vocabulary() -> None:
    # "1" is an id ([UNK]); the word "1" is named by its own id, 3
    assert _bias({"logit_bias": {"2": 5, "Pepper": -100, "[UNK]": 1.5, "3": 2}}) == {
        2: 5.0,
        5: BAN,
        UNK_ID: 1.5,
        3: 2.0,
    }
    assert _bias({"logit_bias": {"1": -1}}) == {UNK_ID: -1.0}


@pytest.mark.parametrize(
    "bias",
    [
        {"8": 1},  # past the vocabulary
        {"99999999999": 1},
        {"saffron": 1},  # not a word of it
        {"olive oil": 1},  # two words
        {"-1": 1},
        {"salt": 1, "2": 1},  # one token twice
        {"101": 1},
    ],
)
def test_a_key_outside_the_vocabulary_is_a_422_naming_logit_bias(bias: dict[str, float]) -> None:
    assert _refused(lambda: _bias({"logit_bias": bias})) == "logit_bias"


@pytest.mark.parametrize(
    "bias", [{"2": 100.01}, {"2": -101}, {str(i): 1 for i in range(301)}, {"": 1}]
)
def test_logit_bias_bounds_are_validation_errors_naming_logit_bias(bias: dict[str, float]) -> None:
    with pytest.raises(ValidationError) as caught:
        SamplingFields.model_validate({"prompt": "x", "logit_bias": bias})
    assert caught.value.errors()[0]["loc"] == ("logit_bias",)


def test_the_server_bans_unk_unless_the_request_gives_it_a_value() -> None:
    assert _bias({}, BAN_UNK) == {UNK_ID: BAN}
    assert _bias({"logit_bias": {"2": 1}}, BAN_UNK) == {2: 1.0, UNK_ID: BAN}
    assert _bias({"logit_bias": {"[UNK]": 0}}, BAN_UNK) == {}  # un-banned; zeros are dropped
    assert _bias({"logit_bias": {"1": 3}}, BAN_UNK) == {UNK_ID: 3.0}
    assert _bias({}, LIMITS) == {}


def test_banning_every_word_is_a_422() -> None:
    every = {str(i): -100 for i in range(1, TOKENIZER.vocab_size)}
    assert _refused(lambda: _bias({"logit_bias": every, "ignore_eos": True})) == "logit_bias"
    assert _bias({"logit_bias": every})[2] == BAN  # the stop token is left


def test_logit_bias_before_the_model_is_loaded_is_not_ready() -> None:
    unloaded = Limits(max_new_tokens=64, max_logprobs=5, default_max_tokens=8)
    with pytest.raises(NotReady):
        _bias({"logit_bias": {"2": 1}}, unloaded)


def test_penalties_reach_the_engine_and_null_means_none() -> None:
    fields = SamplingFields.model_validate(
        {"prompt": "x", "presence_penalty": -2, "frequency_penalty": 2}
    )
    sampling = fields.to_generation(LIMITS).sampling
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (-2.0, 2.0)
    assert sampling.changes_logits
    plain = SamplingFields.model_validate({"prompt": "x", "presence_penalty": None})
    assert not plain.to_generation(LIMITS).sampling.changes_logits
    with pytest.raises(ValidationError):
        SamplingFields.model_validate({"prompt": "x", "frequency_penalty": 2.01})


def test_completions_take_token_ids_only_and_refuse_suffix() -> None:
    request = CompletionRequest.model_validate({"prompt": "x", "logit_bias": {"2": 4}})
    assert dict(request.to_generation(LIMITS).sampling.logit_bias) == {2: 4.0}
    words = CompletionRequest.model_validate({"prompt": "x", "logit_bias": {"salt": 4}})
    assert _refused(lambda: words.to_generation(LIMITS)) == "logit_bias"
    suffix = CompletionRequest.model_validate({"prompt": "x", "suffix": "done"})
    assert _refused(lambda: suffix.to_generation(LIMITS)) == "suffix"
    empty = CompletionRequest.model_validate({"prompt": "x", "suffix": "", "user": "me"})
    empty.to_generation(LIMITS)


def _chat(**body: Any) -> ChatCompletionRequest:
    messages = body.pop("messages", [{"role": "user", "content": "Apple  Pie"}])
    return ChatCompletionRequest.model_validate({"messages": messages, **body})


def test_the_chat_template_makes_the_last_user_message_the_dish() -> None:
    history = [
        {"role": "system", "content": "You are a chef."},
        {"role": "user", "content": "soup"},
        {"role": "assistant", "content": "a recipe for soup"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "apple"}, {"type": "text", "text": "pie"}],
        },
    ]
    assert _chat(messages=history).prompt_text() == "recipe for apple pie |"
    assert _chat().prompt_text() == "recipe for Apple Pie |"
    # with a session, the message is fed as it is, and may be empty (just continue)
    assert _chat(session_id="s").prompt_text() == "Apple  Pie"
    empty = [{"role": "user", "content": ""}]
    assert _chat(messages=empty, session_id="s").prompt_text() == ""


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "tool", "content": "x", "tool_call_id": "1"}], "messages.0.role"),
        (
            [{"role": "user", "content": "x"}, {"role": "function", "content": "x"}],
            "messages.1.role",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}],
            "messages.0.content.0.type",
        ),
        ([{"role": "system", "content": "x"}], "messages"),
        ([{"role": "user", "content": "  "}], "messages.0.content"),
    ],
)
def test_chat_messages_simmer_cannot_serve_are_422_naming_the_field(
    messages: list[dict[str, Any]], param: str
) -> None:
    assert _refused(lambda: _chat(messages=messages).prompt_text()) == param


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("response_format", {"type": "json_object"}),
        ("parallel_tool_calls", False),
        ("audio", {"voice": "alloy", "format": "mp3"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("metadata", {"k": "v"}),
        ("store", True),
        ("service_tier", "flex"),
        ("reasoning_effort", "low"),
        ("verbosity", "low"),
        ("web_search_options", {}),
        ("prompt_cache_retention", "24h"),
    ],
)
def test_each_openai_chat_field_simmer_cannot_honour_is_refused(field: str, value: Any) -> None:
    assert _refused(lambda: _chat(**{field: value}).to_generation(LIMITS)) == field


def test_openai_defaults_of_refused_fields_and_unknown_fields_are_accepted() -> None:
    defaults = {name: harmless[-1] for name, harmless in CHAT_REFUSED.items()}
    request = _chat(**defaults, user="u", safety_identifier="s", prompt_cache_key="k", extra=1)
    assert request.to_generation(LIMITS).prompt == "recipe for Apple Pie |"


def test_chat_sampling_fields_become_engine_parameters() -> None:
    request = _chat(
        max_completion_tokens=9,
        temperature=0.5,
        seed=3,
        stop="x",
        logit_bias={"2": -100},
        presence_penalty=1,
        frequency_penalty=0.5,
        logprobs=True,
        top_logprobs=0,
    )
    generation = request.to_generation(LIMITS)
    assert generation.max_tokens == 9 and generation.stop == ("x",)
    sampling = generation.sampling
    assert sampling.logprobs == 1  # the token's own logprob; no top words listed
    assert request.top_words == 0
    assert dict(sampling.logit_bias) == {2: BAN}
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.seed) == (1, 0.5, 3)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": 6}, "top_logprobs"),  # over max_logprobs
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        (
            {"stream": True, "stream_options": {"include_obfuscation": True}},
            "stream_options.include_obfuscation",
        ),
    ],
)
def test_chat_fields_that_contradict_are_422_naming_the_field(
    body: dict[str, Any], param: str
) -> None:
    assert _refused(lambda: _chat(**body).to_generation(LIMITS)) == param


@given(
    n=st.integers(1, MAX_CHOICES),
    best_of=st.one_of(st.none(), st.integers(1, MAX_CHOICES)),
    max_tokens=st.one_of(st.none(), st.integers(0, 64)),
    echo=st.booleans(),
    stream=st.booleans(),
)
def test_every_admitted_choice_and_echo_mix_is_planned_or_refused_naming_its_field(
    n: int, best_of: int | None, max_tokens: int | None, echo: bool, stream: bool
) -> None:
    body = CompletionRequest(
        prompt="recipe for soup",
        n=n,
        best_of=best_of,
        max_tokens=max_tokens,
        echo=echo,
        stream=stream,
    )
    refused = None  # the field a refusal names, first rule first
    if best_of is not None and (best_of < n or (stream and best_of > n)):
        refused = "best_of"
    elif max_tokens == 0 and not echo:
        refused = "max_tokens"
    elif max_tokens == 0 and n > 1:
        refused = "n"
    if refused is not None:
        with pytest.raises(InvalidRequest) as caught:
            body.to_generation(LIMITS)
        assert caught.value.param == refused
        return
    plan = body.to_generation(LIMITS)
    assert plan.n == n and plan.echo == echo
    assert plan.max_tokens == (LIMITS.default_max_tokens if max_tokens is None else max_tokens)
