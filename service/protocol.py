"""Wire models: what clients send and receive, and how requests become engine parameters.

Handlers only translate between these models and the generation service.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)
from pydantic_core import PydanticCustomError

from service.engine.params import BAN, MIN_TEMPERATURE, SamplingParams
from service.errors import InvalidRequest, NotReady
from simmer.tokenizer import PAD_ID, UNK, UNK_ID, Tokenizer

FinishReason = Literal["length", "stop", "eos", "cancelled", "shutdown", "error"]

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
# The static bounds of every integer field: what the engine's int64 arrays and numpy's
# seeds hold. Tighter limits that come from settings (max_tokens, logprobs) are checked
# in `to_generation` and written into the OpenAPI document by the app.
MAX_INT32 = 2**31 - 1
MAX_SEED = 2**63 - 1

MaxTokens = Annotated[
    int,
    Field(
        ge=0,
        le=MAX_INT32,
        description="Most tokens to generate (the server's max_new_tokens caps it); 0, "
        "with echo, scores the prompt and generates nothing.",
    ),
]
Temperature = Annotated[
    float,
    Field(
        ge=0.0,
        le=100.0,
        description="softmax(logits / T), the book's p^(1/T). Below "
        f"{MIN_TEMPERATURE:g} (and at 0) decoding is greedy.",
    ),
]
TopK = Annotated[
    int,
    Field(
        ge=0,
        le=MAX_INT32,
        description="Keep the k most likely words; 0, or any k at or above the vocabulary "
        "size, keeps all; 1 is greedy.",
    ),
]
TopP = Annotated[float, Field(gt=0.0, le=1.0, description="Nucleus: smallest set reaching p.")]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="Seed for reproducible sampling.")]
Logprobs = Annotated[
    int,
    Field(
        ge=0,
        le=MAX_INT32,
        description="Return the top-k next words with probabilities at each step (the "
        "server's max_logprobs caps it).",
    ),
]

MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_BIAS_KEY_CHARS = 64
MAX_PENALTY = 2.0


def _errors_name_the_field(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A mapping field's errors as one error of the field itself, so that `param` names
    the field (`logit_bias`), not one of its keys."""
    try:
        return handler(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "[key]")
        detail = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        raise PydanticCustomError("invalid_mapping", "{detail}", {"detail": detail}) from None


BiasKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_BIAS_KEY_CHARS)]
BiasValue = Annotated[float, Field(ge=BAN, le=-BAN)]
_ID_KEYS = "Token id (a string of digits, as GET /v1/models/{model}/vocab numbers them)"
_BIAS_VALUES = (
    f"a value from {BAN:g} to {-BAN:g} added to its logit before sampling; exactly "
    f"{BAN:g} bans it. At most {MAX_LOGIT_BIAS} entries."
)
LogitBias = Annotated[
    dict[BiasKey, BiasValue],
    Field(
        max_length=MAX_LOGIT_BIAS, description=f"{_ID_KEYS} or vocabulary word -> {_BIAS_VALUES}"
    ),
    WrapValidator(_errors_name_the_field),
]
TokenIdBias = Annotated[
    dict[BiasKey, BiasValue],
    Field(max_length=MAX_LOGIT_BIAS, description=f"{_ID_KEYS} -> {_BIAS_VALUES}"),
    WrapValidator(_errors_name_the_field),
]
PresencePenalty = Annotated[
    float,
    Field(
        ge=-MAX_PENALTY,
        le=MAX_PENALTY,
        description="Subtracted once from the logit of every word generated so far in this "
        "request.",
    ),
]
FrequencyPenalty = Annotated[
    float,
    Field(
        ge=-MAX_PENALTY,
        le=MAX_PENALTY,
        description="Subtracted from the logit of every word generated so far in this "
        "request, once per time it was generated.",
    ),
]


@dataclass(frozen=True)
class Limits:
    """The request limits from settings that pydantic's static bounds cannot know."""

    max_new_tokens: int
    max_logprobs: int
    default_max_tokens: int
    ban_unk: bool = False  # every request bans [UNK] unless its logit_bias names it
    tokenizer: Tokenizer | None = None  # the served vocabulary, once the model is loaded


@dataclass(frozen=True)
class GenerationRequest:
    """What the generation service needs; no wire details."""

    prompt: str
    session_id: str | None
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    state: str | None = None  # a signed state token to continue from, instead of a session
    return_state: bool = False  # give each choice's signed state token in its done event
    n: int = 1  # choices: one prefill, then n forks sampled in the same batch
    echo: bool = False  # score the prompt (and allow max_tokens 0: scoring only)

    def __post_init__(self) -> None:
        if self.state is not None and self.session_id is not None:
            raise InvalidRequest("give state or session_id, not both", "state")
        if self.max_tokens == 0 and self.n > 1:
            raise InvalidRequest("max_tokens 0 scores the prompt once: n must be 1", "n")


StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
MAX_CHOICES = 16
Choices = Annotated[
    int,
    Field(
        ge=1,
        le=MAX_CHOICES,
        description="How many choices to generate: the prompt is fed once, then each choice "
        "is a fork of its own session, sampled in the same batch. With a seed, choice i "
        "draws as a single request with seed + i would.",
    ),
]
MAX_STATE_CHARS = 8_192  # a book-model token is about 1.6 KB
StateToken = Annotated[
    str,
    Field(
        max_length=MAX_STATE_CHARS,
        description="A signed state token (from `return_state` or GET "
        "/v1/sessions/{id}/state) to continue from instead of a session_id; the session "
        "store is not read. The call's session is new and belongs to the caller.",
    ),
]
ReturnState = Annotated[
    bool,
    Field(
        description="Also answer the session's signed state token after this call "
        "(`state`): any replica with the same SIMMER_STATE_SECRET continues from it.",
    ),
]


def _stop_list(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return value


class SamplingFields(BaseModel):
    """Fields shared by /v1/generate and the WebSocket generate message."""

    prompt: str = Field("", description="Text to feed before generating; appended to the session.")
    session_id: str | None = Field(
        None, description="Continue this session; omit to start a new one.", max_length=64
    )
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_k: TopK = 0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: list[StopString] = Field(
        default_factory=list,
        max_length=MAX_STOP_STRINGS,
        description=f"Up to {MAX_STOP_STRINGS} strings that end the generation when produced.",
    )
    logprobs: Logprobs | None = None
    ignore_eos: bool = Field(
        False, description="Never end at the stop token: always generate max_tokens."
    )
    state: StateToken | None = None
    return_state: ReturnState = False
    echo: bool = Field(
        False,
        description="Also score the prompt: each prompt token's logprob given everything "
        "before it (`prompt_logprobs`), with the top `logprobs` words at each step.",
    )
    logit_bias: LogitBias | None = None
    presence_penalty: PresencePenalty | None = None
    frequency_penalty: FrequencyPenalty | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        return _stop_list(value)

    def to_generation(self, limits: Limits, n: int = 1) -> GenerationRequest:
        max_tokens = self.max_tokens if self.max_tokens is not None else limits.default_max_tokens
        if max_tokens > limits.max_new_tokens or (max_tokens == 0 and not self.echo):
            raise InvalidRequest(
                f"max_tokens must be between 1 and {limits.max_new_tokens} (0 only with echo)",
                "max_tokens",
            )
        logprobs = self.logprobs or 0
        if logprobs > limits.max_logprobs:
            raise InvalidRequest(
                f"logprobs must be between 0 and {limits.max_logprobs}", "logprobs"
            )
        return GenerationRequest(
            prompt=self.prompt,
            session_id=self.session_id,
            max_tokens=max_tokens,
            sampling=SamplingParams(
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                seed=self.seed,
                logprobs=logprobs,
                ignore_eos=self.ignore_eos,
                logit_bias=logit_bias_of(self.logit_bias, limits, self.ignore_eos),
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
            ),
            stop=tuple(self.stop),
            state=self.state,
            return_state=self.return_state,
            n=n,
            echo=self.echo,
        )


_TOKEN_ID = re.compile(r"[0-9]{1,10}")


def _token_of(key: str, tokenizer: Tokenizer) -> int:
    """The token a logit_bias key names: an id (digits), or else a vocabulary word."""
    vocab = tokenizer.vocab_size
    if _TOKEN_ID.fullmatch(key):
        if int(key) < vocab:
            return int(key)
    else:
        ids = tokenizer.encode(key)
        if len(ids) == 1 and (ids[0] != UNK_ID or key.strip().lower() == UNK.lower()):
            return ids[0]
        raise InvalidRequest(
            f"logit_bias: {key[:20]!r} is not a word of the vocabulary (GET "
            "/v1/models/{model}/vocab lists them)",
            "logit_bias",
        )
    raise InvalidRequest(
        f"logit_bias: keys are token ids from 0 to {vocab - 1}; got {key[:20]!r}", "logit_bias"
    )


def logit_bias_of(
    bias: Mapping[str, float] | None, limits: Limits, ignore_eos: bool = False
) -> tuple[tuple[int, float], ...]:
    """A request's logit_bias as (token id, value) pairs, zeros dropped, with the server's
    [UNK] ban added unless the request gives [UNK] a value of its own (0 un-bans it).
    Keys are ids or vocabulary words (`check_token_ids` allows ids only)."""
    values: dict[int, float] = {}
    if bias:
        tokenizer = limits.tokenizer
        if tokenizer is None:
            raise NotReady("the model is still loading")
        for key, value in bias.items():
            token = _token_of(key, tokenizer)
            if token in values:
                raise InvalidRequest(f"logit_bias names token {token} twice", "logit_bias")
            values[token] = value
        banned = {token for token, value in values.items() if value <= BAN}
        if ignore_eos:
            banned.add(PAD_ID)
        if limits.ban_unk and UNK_ID not in values:
            banned.add(UNK_ID)
        if len(banned) >= tokenizer.vocab_size:
            raise InvalidRequest("logit_bias bans every word of the vocabulary", "logit_bias")
    if limits.ban_unk and UNK_ID not in values:
        values[UNK_ID] = BAN
    return tuple((token, value) for token, value in values.items() if value != 0.0)


class GenerateRequest(SamplingFields):
    """POST /v1/generate."""

    model_config = ConfigDict(extra="forbid")

    stream: bool = Field(False, description="Answer text/event-stream token events.")
    n: Choices = 1


class WSGenerate(SamplingFields):
    """WebSocket {"type": "generate", ...}; the connection's session is continued."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["generate"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    fed_tokens: int = Field(
        description="Tokens the engine was fed for this call: the new prompt, plus the "
        "session's pending token. The session's history is never fed again."
    )
    session_tokens: int = Field(description="The session's whole length after this call.")


class TopWord(BaseModel):
    token: str
    id: int
    logprob: float
    prob: float


class TokenLogprobs(BaseModel):
    token: str
    id: int
    logprob: float
    top: list[TopWord]


class GenerateChoice(BaseModel):
    index: int
    session_id: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[TokenLogprobs] | None = None
    state: str | None = Field(None, description="The signed state token, with return_state.")


class PromptLogprob(BaseModel):
    token: str
    id: int
    logprob: float | None = Field(description="None for a first token with no context.")
    top: list[TopWord]


class GenerateResponse(BaseModel):
    """Choice 0 at the top level; with n > 1, every choice in `choices` too."""

    session_id: str
    prompt_logprobs: list[PromptLogprob] | None = Field(
        None, description="With echo: the prompt's tokens, scored."
    )
    text: str
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[TokenLogprobs] | None = None
    state: str | None = Field(None, description="The signed state token, with return_state.")
    choices: list[GenerateChoice] | None = Field(None, description="With n > 1: every choice.")


class SessionCreate(BaseModel):
    """POST /v1/sessions: an empty body starts a fresh session; `state` restores one."""

    model_config = ConfigDict(extra="forbid")

    state: str | None = Field(
        None,
        max_length=65_536,
        description="A signed state from GET /v1/sessions/{id}/state, to restore as a new session.",
    )


class RewindRequest(BaseModel):
    """POST /v1/sessions/{id}/rewind."""

    model_config = ConfigDict(extra="forbid")

    turns: int = Field(
        1,
        ge=1,
        le=255,
        description="How many of the session's last calls to undo: the session goes back to "
        "its state before them.",
    )


class NextWord(BaseModel):
    token: str
    id: int
    logprob: float
    prob: float


class NextWords(BaseModel):
    """GET /v1/sessions/{id}/next: the next-word distribution, the session unchanged."""

    session_id: str
    tokens: int = Field(description="Tokens in the session's context.")
    temperature: float
    top: list[NextWord]


class SessionStateExport(BaseModel):
    session_id: str
    model: str
    state: str = Field(description="Opaque, signed; restore it with POST /v1/sessions.")


class SessionInfo(BaseModel):
    session_id: str
    model: str
    tokens: int = Field(description="Tokens in the session's context.")
    pending_token: bool = Field(description="Whether a generated token waits to be fed.")
    rewind_points: int = Field(description="How many of its last calls a rewind can undo.")
    created: float
    last_used: float
    expires_at: float


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- what OpenAI defines and simmer cannot honour ------------------------------------------

User = Annotated[
    str | None,
    Field(max_length=256, description="Accepted, as OpenAI defines it; simmer does not use it."),
]


class StreamOptions(BaseModel):
    """OpenAI's stream_options; only with `stream: true`."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(
        False, description="Chat: one more chunk before [DONE], with usage and no choices."
    )
    include_obfuscation: bool = Field(False, description="Refused (422) when true.")


def check_stream_options(stream: bool, options: StreamOptions | None) -> None:
    if options is None:
        return
    if not stream:
        raise InvalidRequest("stream_options needs stream: true", "stream_options")
    if options.include_obfuscation:
        raise InvalidRequest(
            "stream_options.include_obfuscation is not supported",
            "stream_options.include_obfuscation",
        )


# field -> the values that ask for nothing simmer lacks (OpenAI's defaults, null, empty)
COMPLETION_REFUSED: dict[str, tuple[Any, ...]] = {"suffix": (None, "")}


def refuse_unsupported(model: BaseModel, refused: Mapping[str, tuple[Any, ...]]) -> None:
    """422 naming the first field of `refused` set to a value other than its harmless ones:
    nothing OpenAI defines is accepted and then ignored."""
    for name, harmless in refused.items():
        value = getattr(model, name)
        if not any(value == fine and type(value) is type(fine) for fine in harmless):
            raise InvalidRequest(f"{name} is not supported by this server", name)


def check_token_ids(bias: Mapping[str, float] | None) -> dict[str, float] | None:
    """OpenAI's logit_bias keys are token ids; words are a /v1/generate extension."""
    for key in bias or ():
        if not _TOKEN_ID.fullmatch(key):
            raise InvalidRequest(
                f"logit_bias: keys are token ids (digits); got {key[:20]!r}", "logit_bias"
            )
    return dict(bias) if bias is not None else None


# --- OpenAI-compatible completions ------------------------------------------------------


class CompletionRequest(BaseModel):
    """POST /v1/completions. Unknown fields are ignored (OpenAI clients send extras);
    OpenAI's own fields that simmer cannot honour are refused (`COMPLETION_REFUSED`)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str] = ""
    max_tokens: MaxTokens | None = 16
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = Field(0, description="simmer extension: keep the k most likely words.")
    n: Choices = 1
    best_of: int | None = Field(
        None,
        ge=1,
        le=MAX_CHOICES,
        description="Generate this many choices and answer the n of highest mean "
        "log-probability (at least n; cannot stream when above n).",
    )
    stream: bool = False
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Seed | None = None
    logprobs: Logprobs | None = None
    echo: bool = False
    ignore_eos: bool = Field(False, description="simmer extension: never end at the stop token.")
    session_id: str | None = Field(None, max_length=64, description="simmer extension.")
    state: StateToken | None = Field(None, description="simmer extension: see /v1/generate.")
    return_state: ReturnState = False
    logit_bias: TokenIdBias | None = None
    presence_penalty: PresencePenalty | None = None
    frequency_penalty: FrequencyPenalty | None = None
    stream_options: StreamOptions | None = None
    user: User = None
    suffix: Any = Field(None, description="Refused (422) unless empty: simmer only appends.")

    def to_generation(self, limits: Limits) -> GenerationRequest:
        refuse_unsupported(self, COMPLETION_REFUSED)
        check_stream_options(self.stream, self.stream_options)
        if self.best_of is not None and self.best_of < self.n:
            raise InvalidRequest("best_of must be at least n", "best_of")
        if self.stream and (self.best_of or self.n) > self.n:
            raise InvalidRequest("best_of above n cannot be streamed", "best_of")
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidRequest("exactly one prompt per request is supported", "prompt")
            prompt = prompt[0]
        fields = SamplingFields(
            prompt=prompt,
            session_id=self.session_id,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=_stop_list(self.stop),
            logprobs=self.logprobs,
            ignore_eos=self.ignore_eos,
            state=self.state,
            return_state=self.return_state,
            echo=self.echo,
            logit_bias=check_token_ids(self.logit_bias),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )
        return fields.to_generation(limits, self.n)


# --- OpenAI-compatible chat completions ---------------------------------------------------

MAX_MESSAGES = 256
MAX_CONTENT_PARTS = 64
MAX_CONTENT_CHARS = 100_000  # the prompt's token limit applies as well
ChatText = Annotated[str, StringConstraints(max_length=MAX_CONTENT_CHARS)]


class ChatContentPart(BaseModel):
    """One part of a message's content; only `text` parts are served."""

    model_config = ConfigDict(extra="ignore")

    type: str = Field(max_length=64, description='Only "text"; any other type is refused (422).')
    text: ChatText | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"] = Field(
        description="system, developer and assistant messages are ignored; the last user "
        "message makes the prompt; tool and function messages are refused (422)."
    )
    content: (
        ChatText | Annotated[list[ChatContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None
    ) = None
    name: str | None = Field(None, max_length=64, description="Accepted; not used.")


# field -> its harmless values (OpenAI's defaults, null, empty); anything else is a 422
CHAT_REFUSED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "metadata": (None, {}),
    "store": (None, False),
    "service_tier": (None, "auto", "default"),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "moderation": (None,),
    "prompt_cache_retention": (None,),
    "prompt_cache_options": (None,),
}


def _refused(default: Any = None) -> Any:
    return Field(default, description="OpenAI's; refused (422) unless null or its default.")


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions, through the recipe template (`prompt_text`). Unknown
    fields are ignored (OpenAI clients send extras); OpenAI's own fields that simmer
    cannot honour are refused (`CHAT_REFUSED`)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = Field(0, description="simmer extension: keep the k most likely words.")
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Seed | None = None
    logit_bias: TokenIdBias | None = None
    presence_penalty: PresencePenalty | None = None
    frequency_penalty: FrequencyPenalty | None = None
    logprobs: bool | None = Field(None, description="Report each token's log-probability.")
    top_logprobs: Logprobs | None = Field(
        None, description="With logprobs: the top words at each step (max_logprobs caps it)."
    )
    ignore_eos: bool = Field(False, description="simmer extension: never end at the stop token.")
    session_id: str | None = Field(
        None, max_length=64, description="simmer extension: continue this session."
    )
    state: StateToken | None = Field(None, description="simmer extension: see /v1/generate.")
    return_state: ReturnState = False
    user: User = None
    safety_identifier: User = None
    prompt_cache_key: User = None
    tools: Any = _refused()
    tool_choice: Any = _refused()
    parallel_tool_calls: Any = _refused()
    functions: Any = _refused()
    function_call: Any = _refused()
    response_format: Any = _refused()
    audio: Any = _refused()
    modalities: Any = _refused()
    prediction: Any = _refused()
    metadata: Any = _refused()
    store: Any = _refused()
    service_tier: Any = _refused()
    reasoning_effort: Any = _refused()
    verbosity: Any = _refused()
    web_search_options: Any = _refused()
    moderation: Any = _refused()
    prompt_cache_retention: Any = _refused()
    prompt_cache_options: Any = _refused()

    @property
    def top_words(self) -> int | None:
        """How many top words each logprobs entry lists; None without logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt_text(self) -> str:
        """The chat template. The last user message's text is the dish of a new session's
        prompt, `recipe for <dish> |`; with a session_id it is fed as it is, continuing
        the session's text (empty: just continue). System, developer and assistant
        messages are ignored; tool and function messages, and content parts other than
        text, are refused."""
        last: tuple[int, str] | None = None
        for i, message in enumerate(self.messages):
            if message.role in ("tool", "function"):
                raise InvalidRequest(
                    f"{message.role} messages are not supported: simmer has no tools",
                    f"messages.{i}.role",
                )
            text = _message_text(message.content, i)
            if message.role == "user":
                last = (i, text)
        if last is None:
            raise InvalidRequest("messages needs a user message: the dish", "messages")
        i, text = last
        if self.session_id is not None:
            return text
        dish = " ".join(text.split())
        if not dish:
            raise InvalidRequest(
                "the last user message is empty: name a dish", f"messages.{i}.content"
            )
        return f"recipe for {dish} |"

    def to_generation(self, limits: Limits) -> GenerationRequest:
        refuse_unsupported(self, CHAT_REFUSED)
        check_stream_options(self.stream, self.stream_options)
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", "top_logprobs")
        top = self.top_words
        if top is not None and top > limits.max_logprobs:
            raise InvalidRequest(
                f"top_logprobs must be between 0 and {limits.max_logprobs}", "top_logprobs"
            )
        max_tokens = (
            self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens
        )
        if self.max_tokens is not None and self.max_tokens != max_tokens:
            raise InvalidRequest(
                "max_tokens and max_completion_tokens disagree; give one", "max_tokens"
            )
        fields = SamplingFields(
            prompt=self.prompt_text(),
            session_id=self.session_id,
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=_stop_list(self.stop),
            logprobs=None if top is None else max(top, 1),
            ignore_eos=self.ignore_eos,
            logit_bias=check_token_ids(self.logit_bias),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            state=self.state,
            return_state=self.return_state,
        )
        return fields.to_generation(limits)


def _message_text(content: str | list[ChatContentPart] | None, index: int) -> str:
    """A message's text: its string, or its text parts joined by spaces."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type != "text":
            raise InvalidRequest(
                f"content parts of type {part.type!r} are not supported: only text",
                f"messages.{index}.content.{j}.type",
            )
        texts.append(part.text or "")
    return " ".join(texts)


# request models that refuse unknown fields; the OpenAPI document says so too
STRICT_REQUESTS: tuple[type[BaseModel], ...] = (GenerateRequest, SessionCreate, RewindRequest)
# every request body: the OpenAPI document shows the bounds of each of their fields
REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    GenerateRequest,
    CompletionRequest,
    SessionCreate,
    RewindRequest,
    ChatCompletionRequest,  # and the models inside requests, which are components too
    ChatMessage,
    ChatContentPart,
    StreamOptions,
)


def invalid_field(param: str | None, detail: str) -> InvalidRequest:
    """A 422 naming the field at fault."""
    return InvalidRequest(f"{param}: {detail}" if param else detail, param)


def invalid_request_of(exc: ValidationError) -> InvalidRequest:
    """A pydantic validation error as a 422 naming its first field."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return invalid_field(param, str(first.get("msg")))


def openai_finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def now() -> int:
    return int(time.time())
