"""Events as the wire carries them: JSON-ready dicts, the same for SSE and WebSocket,
and the one place that frames a server-sent event."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from service.generation.events import DoneEvent, Logprob, PromptToken, SessionEvent, TokenEvent

_encode = msgspec.json.Encoder().encode


def encode(obj: Any) -> bytes:
    return _encode(obj)


def sse(obj: Any) -> bytes:
    """One server-sent event whose data is `obj` as JSON."""
    return b"data: " + _encode(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"  # the OpenAI stream's last event


def _word(word: Logprob) -> dict[str, Any]:
    return {
        "token": word.token,
        "id": word.id,
        "logprob": word.logprob,
        "prob": math.exp(word.logprob),
    }


def logprobs_json(steps: list[Logprob]) -> list[dict[str, Any]]:
    return [
        {"token": s.token, "id": s.id, "logprob": s.logprob, "top": [_word(w) for w in s.top]}
        for s in steps
    ]


def token_json(event: TokenEvent) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "token",
        "text": event.text,
        "index": event.index,
        "count": event.count,
    }
    if event.logprobs is not None:
        out["logprobs"] = logprobs_json(event.logprobs)
    if event.choice is not None:
        out["choice"] = event.choice
    return out


def usage_json(event: DoneEvent) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
        "fed_tokens": event.fed_tokens,
        "session_tokens": event.session_tokens,
    }


def done_json(event: DoneEvent) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "done",
        "finish_reason": event.finish_reason,
        "usage": usage_json(event),
        "session_id": event.session_id,
    }
    if event.choice is not None:
        out["choice"] = event.choice
    if event.state is not None:
        out["state"] = event.state
    return out


def prompt_json(prompt: tuple[PromptToken, ...]) -> list[dict[str, Any]]:
    """Echo: the prompt's tokens, scored, as `logprobs_json` gives generated ones."""
    return [
        {"token": p.token, "id": p.id, "logprob": p.logprob, "top": [_word(w) for w in p.top]}
        for p in prompt
    ]


def session_json(event: SessionEvent) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "session", "session_id": event.session_id}
    if event.choice is not None:
        out["choice"] = event.choice
    if event.prompt is not None:
        out["prompt_logprobs"] = prompt_json(event.prompt)
    return out
