"""OpenAI-compatible /v1/completions and /v1/models, and the vocabulary for logit_bias.

Works with the official `openai` client, streaming or not. `session_id` may be passed
as an extra body field to continue a session; responses carry `session_id` too.
Unknown fields are accepted and ignored, as OpenAI clients send extras; a field OpenAI
defines and simmer cannot honour is refused with 422 naming it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncGenerator, Callable
from typing import Any

from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.response import Stream

from service.errors import INTERNAL, DomainError, ModelNotFound, NotReady, render
from service.generation.events import DoneEvent, Event, Logprob, SessionEvent, TokenEvent
from service.protocol import CompletionRequest, now, openai_finish_reason
from service.routes.frames import SSE_DONE, sse, usage_json
from service.routes.http import (
    V1_ERRORS,
    client_gone,
    collect,
    errors,
    event_stream,
    owner_of,
    runtime_of,
)
from simmer.tokenizer import PAD_ID, UNK_ID

logger = logging.getLogger(__name__)


def _logprobs(steps: list[Logprob], offsets: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """OpenAI's logprobs object; `offsets` are where each token's text begins in the
    completion's text, as the text stream placed it (punctuation takes no space)."""
    return {
        "tokens": [s.token for s in steps],
        "token_logprobs": [s.logprob for s in steps],
        "top_logprobs": [{w.token: w.logprob for w in s.top} for s in steps],
        "text_offset": list(offsets[: len(steps)]),
    }


def _chunk(
    completion_id: str,
    model: str,
    text: str,
    finish: str | None,
    session_id: str,
    logprobs: dict[str, Any] | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}],
        "session_id": session_id,
    }
    if usage is not None:
        body["usage"] = usage
    return body


async def _openai_stream(
    completion_id: str,
    model: str,
    first: Event,
    events: AsyncGenerator[Event, None],
    want_logprobs: bool,
    on_error: Callable[[str], None],
) -> AsyncGenerator[bytes, None]:
    assert isinstance(first, SessionEvent)
    session_id = first.session_id
    try:
        async for event in events:
            if isinstance(event, TokenEvent):
                lp = _logprobs(event.logprobs or [], event.offsets) if want_logprobs else None
                yield sse(_chunk(completion_id, model, event.text, None, session_id, lp))
            elif isinstance(event, DoneEvent):
                final = _chunk(
                    completion_id,
                    model,
                    "",
                    openai_finish_reason(event.finish_reason),
                    session_id,
                    usage=usage_json(event),
                )
                yield sse(final)
    except DomainError as exc:
        error = render(exc)
        on_error(error.code)
        yield sse({"error": error.event()})
    except Exception:  # a bug: the client still gets an error chunk and the stream ends
        logger.exception("stream failed")
        on_error(INTERNAL.code)
        yield sse({"error": INTERNAL.event()})
    finally:
        await events.aclose()
    yield SSE_DONE


@post(
    "/v1/completions",
    status_code=200,
    summary="OpenAI-compatible completions",
    description="Streaming answers are text/event-stream chunks ending with `data: [DONE]`.",
    responses=errors(*V1_ERRORS),
)
async def completions(
    data: CompletionRequest, state: State, request: Request[Any, Any, Any]
) -> Response[dict[str, Any]] | Stream:
    runtime = runtime_of(state)
    model = runtime.bundle.name if runtime.bundle is not None else "simmer"
    if data.model not in (None, "", model):
        raise ModelNotFound(f"model {data.model!r} is not served here", "model")
    params = data.to_generation(runtime.limits)
    events = runtime.service().generate(params, owner_of(request))
    first = await anext(events)
    completion_id = "cmpl-" + secrets.token_hex(12)
    want_logprobs = bool(params.sampling.logprobs)
    if data.stream:
        return event_stream(
            _openai_stream(
                completion_id, model, first, events, want_logprobs, runtime.metrics.failure
            )
        )
    assert isinstance(first, SessionEvent)
    result = await collect(events, request, runtime.service().stopper(first.session_id))
    if result is None:
        return client_gone()
    body = _chunk(
        completion_id,
        model,
        result.text,
        openai_finish_reason(result.done.finish_reason),
        first.session_id,
        _logprobs(result.logprobs, result.offsets) if want_logprobs else None,
        usage_json(result.done),
    )
    return Response(body)


@get("/v1/models", summary="OpenAI-compatible model list", responses=errors())
async def models(state: State) -> dict[str, Any]:
    runtime = runtime_of(state)
    bundle = runtime.bundle
    entries = []
    if bundle is not None:
        entries.append(
            {
                "id": bundle.name,
                "object": "model",
                "created": int(bundle.path.stat().st_mtime),
                "owned_by": "simmer",
                "version": bundle.version,
                "limits": {
                    "max_new_tokens": runtime.settings.max_new_tokens,
                    "default_max_tokens": runtime.settings.default_max_tokens,
                    "max_prompt_tokens": runtime.settings.max_prompt_tokens,
                    "max_logprobs": runtime.settings.max_logprobs,
                },
            }
        )
    return {"object": "list", "data": entries}


@get(
    "/v1/models/{model_id:str}/vocab",
    summary="The model's vocabulary: the token ids that logit_bias takes",
    description="`words[i]` is the word of token id `i`; id 0 (the empty word) is the stop "
    "token and id 1 is `[UNK]`, any word outside the vocabulary.",
    responses=errors(404, 503),
)
async def vocab(model_id: str, state: State) -> dict[str, Any]:
    bundle = runtime_of(state).bundle
    if bundle is None:
        raise NotReady("the model is still loading")
    if model_id != bundle.name:
        raise ModelNotFound(f"model {model_id!r} is not served here", "model_id")
    words = bundle.tokenizer.vocab
    return {
        "object": "vocabulary",
        "model": bundle.name,
        "version": bundle.version,
        "size": len(words),
        "stop_token_id": PAD_ID,
        "unk_token_id": UNK_ID,
        "words": words,
    }
