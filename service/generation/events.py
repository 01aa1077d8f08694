"""What a generation yields: a session event, token events, then one done event."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Logprob:
    """A word with its log-probability; for a generated token, also the top words it was
    drawn among (`top`), each a Logprob without top words of its own."""

    token: str
    id: int
    logprob: float
    top: tuple[Logprob, ...] = ()


@dataclass(frozen=True)
class PromptToken:
    """One prompt token, scored (echo): its logprob given everything before it (None for
    a first token with nothing before it) and the top words at its step."""

    token: str
    id: int
    logprob: float | None
    top: tuple[Logprob, ...] = ()


@dataclass(frozen=True)
class SessionEvent:
    session_id: str
    created: bool
    choice: int | None = None  # with n > 1: which choice (each has a session of its own)
    prompt: tuple[PromptToken, ...] | None = None  # with echo (on choice 0's event)


@dataclass(frozen=True)
class TokenEvent:
    text: str
    index: int  # index of the first generated token this event covers
    count: int  # how many generated tokens it covers
    logprobs: list[Logprob] | None = None
    offsets: tuple[int, ...] = ()  # where each covered token's text begins, in the call's text
    choice: int | None = None  # with n > 1


@dataclass(frozen=True)
class DoneEvent:
    session_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    fed_tokens: int = 0  # fed to the engine for this call: the prompt and the pending token
    session_tokens: int = 0  # the session's length after the call
    choice: int | None = None  # with n > 1
    state: str | None = None  # the session's signed state token, when asked for
    mean_logprob: float | None = None  # of the generated tokens, when they were scored


Event = SessionEvent | TokenEvent | DoneEvent
