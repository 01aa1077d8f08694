"""Events as JSON-ready dicts: the same token and done events for SSE and WebSocket."""

from __future__ import annotations

from typing import Any

import msgspec

from service.generation import DoneEvent, StepLogprobs, TokenEvent

_encode = msgspec.json.Encoder().encode


def encode(obj: Any) -> bytes:
    return _encode(obj)


def logprobs_json(steps: list[StepLogprobs]) -> list[dict[str, Any]]:
    import math

    return [
        {
            "token": s.token,
            "id": s.id,
            "logprob": s.logprob,
            "top": [
                {"token": w.token, "id": w.id, "logprob": w.logprob, "prob": math.exp(w.logprob)}
                for w in s.top
            ],
        }
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
    return out


def usage_json(event: DoneEvent) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def done_json(event: DoneEvent) -> dict[str, Any]:
    return {
        "type": "done",
        "finish_reason": event.finish_reason,
        "usage": usage_json(event),
        "session_id": event.session_id,
    }


def error_json(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if param is not None:
        out["param"] = param
    return out
