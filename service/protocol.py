"""Wire models: what clients send and receive, and how requests become engine parameters.

Handlers only translate between these models and the generation service.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from service.engine.params import MIN_TEMPERATURE, SamplingParams
from service.errors import InvalidRequest

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


@dataclass(frozen=True)
class Limits:
    """The request limits from settings that pydantic's static bounds cannot know."""

    max_new_tokens: int
    max_logprobs: int
    default_max_tokens: int


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
            ),
            stop=tuple(self.stop),
            state=self.state,
            return_state=self.return_state,
            n=n,
            echo=self.echo,
        )


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


# --- OpenAI-compatible completions ------------------------------------------------------


class CompletionRequest(BaseModel):
    """POST /v1/completions. Unknown fields are ignored: OpenAI clients send extras."""

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

    def to_generation(self, limits: Limits) -> GenerationRequest:
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
        )
        return fields.to_generation(limits, self.n)


# request models that refuse unknown fields; the OpenAPI document says so too
STRICT_REQUESTS: tuple[type[BaseModel], ...] = (GenerateRequest, SessionCreate, RewindRequest)
# every request body: the OpenAPI document shows the bounds of each of their fields
REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    GenerateRequest,
    CompletionRequest,
    SessionCreate,
    RewindRequest,
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
