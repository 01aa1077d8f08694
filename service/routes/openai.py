"""OpenAI-compatible /v1/completions and /v1/models, and the vocabulary for logit_bias.

Works with the official `openai` client, streaming or not. `session_id` may be passed
as an extra body field to continue a session; responses carry `session_id` too.
Unknown fields are accepted and ignored, as OpenAI clients send extras; a field OpenAI
defines and simmer cannot honour is refused with 422 naming it.
"""

from __future__ import annotations

import contextlib
import math
import secrets
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import Any

from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.response import Stream

from service.errors import DomainError, ModelNotFound, NotReady
from service.generation.events import (
    DoneEvent,
    Event,
    Logprob,
    PromptToken,
    SessionEvent,
    TokenEvent,
)
from service.protocol import CompletionRequest, now, openai_finish_reason
from service.routes.frames import sse, usage_json
from service.routes.http import (
    V1_ERRORS,
    Collected,
    client_gone,
    collect_choices,
    errors,
    event_stream,
    guarded,
    owner_of,
    runtime_of,
)
from service.state import ServiceState
from simmer.tokenizer import PAD_ID, UNK_ID


def _logprobs(steps: list[Logprob], offsets: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """OpenAI's logprobs object; `offsets` are where each token's text begins in the
    completion's text, as the text stream placed it (punctuation takes no space)."""
    return {
        "tokens": [s.token for s in steps],
        "token_logprobs": [s.logprob for s in steps],
        "top_logprobs": [{w.token: w.logprob for w in s.top} for s in steps],
        "text_offset": list(offsets[: len(steps)]),
    }


def _echo_logprobs(text: str, prompt: tuple[PromptToken, ...]) -> dict[str, Any]:
    """OpenAI's logprobs object for an echoed prompt: a first token with nothing before it
    has null logprobs; offsets are where each token's word is found in the prompt as sent
    (its case and spacing kept)."""
    lowered, cursor, offsets = text.lower(), 0, []
    for token in prompt:
        found = lowered.find(token.token, cursor) if token.token else -1
        offsets.append(cursor if found < 0 else found)
        cursor = cursor if found < 0 else found + len(token.token)
    return {
        "tokens": [p.token for p in prompt],
        "token_logprobs": [p.logprob for p in prompt],
        "top_logprobs": [
            None if p.logprob is None else {w.token: w.logprob for w in p.top} for p in prompt
        ],
        "text_offset": offsets,
    }


def _joined(echo: dict[str, Any] | None, completion: dict[str, Any] | None, shift: int) -> Any:
    """The echoed prompt's logprobs, then the completion's (its offsets moved past it)."""
    if echo is None or completion is None:
        return echo or completion
    return {
        key: echo[key]
        + ([o + shift for o in completion[key]] if key == "text_offset" else completion[key])
        for key in echo
    }


def _choice(
    index: int,
    text: str,
    finish: str | None,
    session_id: str,
    logprobs: dict[str, Any] | None = None,
    state: str | None = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "text": text,
        "index": index,
        "logprobs": logprobs,
        "finish_reason": finish,
        "session_id": session_id,  # simmer extension: each choice is a session of its own
    }
    if state is not None:
        choice["state"] = state
    return choice


def _chunk(
    completion_id: str,
    model: str,
    choices: list[dict[str, Any]],
    session_id: str,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": choices,
        "session_id": session_id,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def _usage(done: list[DoneEvent]) -> dict[str, int]:
    """The whole request's usage: the prompt once, every choice's completion. With n > 1
    the prefill is shared: all but the last token fed once, the last once per choice."""
    usage = usage_json(done[0])
    completion = sum(d.completion_tokens for d in done)
    usage["completion_tokens"] = completion
    usage["total_tokens"] = usage["prompt_tokens"] + completion
    usage["fed_tokens"] += sum(1 for d in done[1:] if d.fed_tokens)
    return usage


async def _openai_stream(
    completion_id: str,
    model: str,
    first: Event,
    events: AsyncGenerator[Event, None],
    want_logprobs: bool,
    echo: str | None = None,
) -> AsyncGenerator[bytes, None]:
    """Completion chunks (`guarded` adds the error chunk and [DONE]); with `echo` (the
    prompt as sent), each choice's first chunk is the prompt, with its scored tokens
    when logprobs are asked for."""
    assert isinstance(first, SessionEvent)
    session_id = first.session_id
    sessions: dict[int, str] = {}
    finished: list[DoneEvent] = []
    scored = first.prompt

    def announced(event: SessionEvent) -> bytes | None:
        index = event.choice or 0
        sessions[index] = event.session_id
        if echo is None:
            return None
        lp = _echo_logprobs(echo, scored) if want_logprobs and scored else None
        return sse(
            _chunk(
                completion_id, model, [_choice(index, echo, None, event.session_id, lp)], session_id
            )
        )

    if (opening := announced(first)) is not None:
        yield opening
    async for event in events:
        if isinstance(event, SessionEvent):
            if (opening := announced(event)) is not None:
                yield opening
        elif isinstance(event, TokenEvent):
            lp = _logprobs(event.logprobs or [], event.offsets) if want_logprobs else None
            index = event.choice or 0
            choice = _choice(index, event.text, None, sessions[index], lp)
            yield sse(_chunk(completion_id, model, [choice], session_id))
        elif isinstance(event, DoneEvent):
            finished.append(event)
            index = event.choice or 0
            reason = openai_finish_reason(event.finish_reason)
            choice = _choice(index, "", reason, event.session_id, state=event.state)
            last = len(finished) == len(sessions)
            usage = _usage(sorted(finished, key=lambda d: d.choice or 0)) if last else None
            yield sse(_chunk(completion_id, model, [choice], session_id, usage))


def served_model(runtime: ServiceState, asked: str | None) -> str:
    """The name of the model served here; 404 when a request asks for another."""
    model = runtime.bundle.name if runtime.bundle is not None else "simmer"
    if asked not in (None, "", model):
        raise ModelNotFound(f"model {asked!r} is not served here", "model")
    return model


@post(
    "/v1/completions",
    status_code=200,
    summary="OpenAI-compatible completions",
    description="Streaming answers are text/event-stream chunks ending with `data: [DONE]`. "
    "With n > 1 each choice is a session of its own (`choices[i].session_id`); with "
    "best_of, the n choices of highest mean log-probability are kept and the other "
    "sessions deleted.",
    responses=errors(*V1_ERRORS),
)
async def completions(
    data: CompletionRequest, state: State, request: Request[Any, Any, Any]
) -> Response[dict[str, Any]] | Stream:
    runtime = runtime_of(state)
    model = served_model(runtime, data.model)
    params = data.to_generation(runtime.limits)
    want_logprobs = bool(params.sampling.logprobs)
    candidates = data.best_of or data.n
    if candidates > data.n:  # ranking needs every candidate's logprobs
        sampling = replace(params.sampling, logprobs=max(1, params.sampling.logprobs))
        params = replace(params, sampling=sampling, n=candidates)
    generation = runtime.service()
    events = generation.generate(params, owner_of(request))
    first = await anext(events)
    completion_id = "cmpl-" + secrets.token_hex(12)
    echo = params.prompt if data.echo else None
    if data.stream:
        frames = _openai_stream(completion_id, model, first, events, want_logprobs, echo)
        return event_stream(guarded(frames, events, runtime.metrics.failure, openai=True))
    assert isinstance(first, SessionEvent)
    results = await collect_choices(events, request, generation.stopper(first.session_id))
    if results is None:
        return client_gone()
    kept = results
    if candidates > data.n:

        def rank(result: Collected) -> float:
            mean = result.done.mean_logprob
            return -math.inf if mean is None else mean

        ranked = sorted(results, key=rank, reverse=True)
        kept = ranked[: data.n]
        for dropped in ranked[data.n :]:
            if dropped is results[0]:
                continue  # choice 0 is the session the request continues: it stays
            with contextlib.suppress(DomainError):
                await generation.sessions.delete(dropped.done.session_id, owner_of(request))
    scored = _echo_logprobs(echo, first.prompt) if echo is not None and first.prompt else None
    choices = [
        _choice(
            index,
            (echo or "") + result.text,
            openai_finish_reason(result.done.finish_reason),
            result.done.session_id,
            _joined(scored, _logprobs(result.logprobs, result.offsets), len(echo or ""))
            if want_logprobs
            else None,
            result.done.state,
        )
        for index, result in enumerate(kept)
    ]
    body = _chunk(
        completion_id,
        model,
        choices,
        kept[0].done.session_id,
        _usage([r.done for r in results]),
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
