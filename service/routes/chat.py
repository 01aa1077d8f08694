"""OpenAI-compatible /v1/chat/completions, through simmer's recipe template.

The model writes recipes; it does not converse. `ChatCompletionRequest.prompt_text`
makes the prompt: the last user message names the dish of a new session
(`recipe for <dish> |`), or, with a `session_id` extra body field, is fed as it is to
continue that session. The recipe comes back as one assistant message, or streamed as
`chat.completion.chunk` events ending with `data: [DONE]`; responses carry `session_id`.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator
from typing import Any

from litestar import Request, Response, post
from litestar.datastructures import State
from litestar.response import Stream

from service.generation.events import DoneEvent, Event, Logprob, SessionEvent, TokenEvent
from service.protocol import ChatCompletionRequest, now, openai_finish_reason
from service.routes.frames import sse, usage_json
from service.routes.http import (
    V1_ERRORS,
    client_gone,
    collect_choices,
    errors,
    event_stream,
    guarded,
    owner_of,
    runtime_of,
)
from service.routes.openai import served_model


def _logprobs(steps: list[Logprob], top: int) -> dict[str, Any]:
    """OpenAI's chat logprobs object: each token with its `top` most likely words."""

    def entry(word: Logprob) -> dict[str, Any]:
        return {"token": word.token, "logprob": word.logprob, "bytes": list(word.token.encode())}

    return {
        "content": [{**entry(s), "top_logprobs": [entry(w) for w in s.top[:top]]} for s in steps],
        "refusal": None,
    }


def _chunk(
    chat_id: str,
    model: str,
    session_id: str,
    choices: list[dict[str, Any]],
    usage: dict[str, int] | None = None,
    with_usage: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": chat_id,
        "object": "chat.completion.chunk",
        "created": now(),
        "model": model,
        "choices": choices,
        "session_id": session_id,
    }
    if with_usage:
        body["usage"] = usage
    return body


def _choice(delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


async def _chat_stream(
    chat_id: str,
    model: str,
    first: Event,
    events: AsyncGenerator[Event, None],
    top: int | None,
    include_usage: bool,
) -> AsyncGenerator[bytes, None]:
    """The role, then the text as it comes, then the finish reason; with include_usage,
    one more chunk with the usage and no choices (`guarded` adds [DONE])."""
    assert isinstance(first, SessionEvent)
    session_id = first.session_id

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        return sse(_chunk(chat_id, model, session_id, choices, usage, include_usage))

    yield chunk([_choice({"role": "assistant", "content": ""}, None)])
    async for event in events:
        if isinstance(event, TokenEvent):
            lp = _logprobs(event.logprobs or [], top) if top is not None else None
            yield chunk([_choice({"content": event.text}, None, lp)])
        elif isinstance(event, DoneEvent):
            finish = _choice({}, openai_finish_reason(event.finish_reason))
            if event.state is not None:
                finish["state"] = event.state  # simmer extension, with return_state
            yield chunk([finish])
            if include_usage:
                yield chunk([], usage_json(event))


@post(
    "/v1/chat/completions",
    status_code=200,
    summary="OpenAI-compatible chat completions, through the recipe template",
    description="The last user message names the dish: a new session's prompt is "
    "`recipe for <dish> |`; with a `session_id` the message is fed as it is, continuing "
    "that session. System, developer and assistant messages are ignored. Streaming answers "
    "are text/event-stream `chat.completion.chunk` events ending with `data: [DONE]`.",
    responses=errors(*V1_ERRORS),
)
async def chat_completions(
    data: ChatCompletionRequest, state: State, request: Request[Any, Any, Any]
) -> Response[dict[str, Any]] | Stream:
    runtime = runtime_of(state)
    model = served_model(runtime, data.model)
    params = data.to_generation(runtime.limits)
    events = runtime.service().generate(params, owner_of(request))
    first = await anext(events)
    chat_id = "chatcmpl-" + secrets.token_hex(12)
    top = data.top_words
    if data.stream:
        include_usage = data.stream_options is not None and data.stream_options.include_usage
        frames = _chat_stream(chat_id, model, first, events, top, include_usage)
        return event_stream(guarded(frames, events, runtime.metrics.failure, openai=True))
    assert isinstance(first, SessionEvent)
    results = await collect_choices(events, request, runtime.service().stopper(first.session_id))
    if results is None:
        return client_gone()
    result = results[0]  # n is 1
    message = {"role": "assistant", "content": result.text, "refusal": None}
    choice = {
        "index": 0,
        "message": message,
        "logprobs": _logprobs(result.logprobs, top) if top is not None else None,
        "finish_reason": openai_finish_reason(result.done.finish_reason),
    }
    body = {
        "id": chat_id,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [choice],
        "usage": usage_json(result.done),
        "session_id": first.session_id,
        **({"state": result.done.state} if result.done.state is not None else {}),
    }
    return Response(body)
