"""simmer's own HTTP API: generate (JSON or SSE), sessions, probes and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from litestar import Request, Response, delete, get, post
from litestar.background_tasks import BackgroundTask
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from litestar.response import Stream
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.engine.params import MIN_TEMPERATURE
from service.errors import INTERNAL, DomainError, InvalidRequest, Rendered, render
from service.generation.events import DoneEvent, Event, Logprob, SessionEvent, TokenEvent
from service.protocol import (
    MAX_INT32,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    NextWord,
    NextWords,
    RewindRequest,
    SessionCreate,
    SessionInfo,
    SessionStateExport,
    logit_bias_of,
)
from service.routes.frames import (
    SSE_DONE,
    done_json,
    logprobs_json,
    prompt_json,
    session_json,
    sse,
    token_json,
    usage_json,
)
from service.sessions import SessionState
from service.state import ServiceState

ERROR_DESCRIPTIONS = {
    400: "Malformed request body",
    401: "Missing or wrong API key",
    404: "Session (or model) not found",
    409: "Session busy, or bound to another model",
    413: "Request body too large",
    422: "Invalid field; `param` names it",
    429: "Rate limited; see Retry-After",
    500: "The engine failed during this generation (engine_error)",
    503: "Overloaded, shutting down, not ready, or the session store is unavailable",
}

logger = logging.getLogger(__name__)


def errors(*codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the error responses a route can give: all one shape."""
    return {
        code: ResponseSpec(data_container=ErrorResponse, description=ERROR_DESCRIPTIONS[code])
        for code in (*codes, 401, 429)
    }


V1_ERRORS = (400, 404, 409, 413, 422, 500, 503)


def owner_of(request: Request[Any, Any, Any]) -> str:
    return str(request.scope.get("simmer_owner", ""))


def runtime_of(state: State) -> ServiceState:
    runtime: ServiceState = state.runtime
    return runtime


async def guarded(
    body: AsyncGenerator[bytes, None],
    events: AsyncGenerator[Event, None],
    on_error: Callable[[str], None],
    openai: bool = False,
) -> AsyncGenerator[bytes, None]:
    """A stream's frames, with what every stream does on failure: an error after the
    stream has begun (the engine failing, say) is one error event, counted with
    `on_error`, and then the end. The generation is always closed, even when the client
    leaves. An OpenAI stream wraps the error as OpenAI does and ends with [DONE]."""
    try:
        async for frame in body:
            yield frame
    except DomainError as exc:
        error = render(exc)
        on_error(error.code)
        yield sse({"error": error.event()} if openai else error.event())
    except Exception:  # a bug: the client still gets an error event and the stream ends
        logger.exception("stream failed")
        on_error(INTERNAL.code)
        yield sse({"error": INTERNAL.event()} if openai else INTERNAL.event())
    finally:
        await body.aclose()
        await events.aclose()
    if openai:
        yield SSE_DONE


def sse_stream(
    first: Event, events: AsyncGenerator[Event, None], on_error: Callable[[str], None]
) -> AsyncGenerator[bytes, None]:
    """simmer's own `data: {json}` events for a generation (see `guarded`)."""
    return guarded(_sse_frames(first, events), events, on_error)


async def _sse_frames(
    first: Event, events: AsyncGenerator[Event, None]
) -> AsyncGenerator[bytes, None]:
    if isinstance(first, SessionEvent):
        yield sse(session_json(first))
    async for event in events:
        if isinstance(event, TokenEvent):
            yield sse(token_json(event))
        elif isinstance(event, DoneEvent):
            if event.choice is None:
                await events.aclose()  # unlock the session before the client reuses it
            yield sse(done_json(event))
        elif isinstance(event, SessionEvent):
            yield sse(session_json(event))


def event_stream(body: AsyncGenerator[bytes, None]) -> Stream:
    """A text/event-stream response that always closes `body`.

    When the client goes away, Litestar stops iterating but never closes the
    generator; closing it in the response's background task runs its `finally`, which
    cancels the generation within one engine step and frees its slot.
    """
    return Stream(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(body.aclose),
    )


@post(
    "/v1/generate",
    status_code=HTTP_200_OK,
    summary="Generate text, continuing a session or starting one",
    description="JSON by default; with `stream: true` the answer is text/event-stream, one "
    '`data: {json}` event per token (`{"type": "token", "text", "index", "count"}`), then '
    '`{"type": "done", "finish_reason", "usage", "session_id"}`.',
    responses={
        200: ResponseSpec(GenerateResponse, description="The generated text"),
        **errors(*V1_ERRORS),
    },
)
async def generate(
    data: GenerateRequest, state: State, request: Request[Any, Any, Any]
) -> Response[GenerateResponse] | Stream:
    runtime = runtime_of(state)
    params = data.to_generation(runtime.limits, data.n)
    events = runtime.service().generate(params, owner_of(request))
    first = await anext(events)  # bad input raises here, before any byte is sent
    if data.stream:
        return event_stream(sse_stream(first, events, runtime.metrics.failure))
    assert isinstance(first, SessionEvent)
    results = await collect_choices(events, request, runtime.service().stopper(first.session_id))
    if results is None:
        return client_gone()
    choices = [
        {
            "index": index,
            "session_id": result.done.session_id,
            "text": result.text,
            "finish_reason": result.done.finish_reason,
            "usage": usage_json(result.done),
            "logprobs": logprobs_json(result.logprobs) if params.sampling.logprobs else None,
            "state": result.done.state,
        }
        for index, result in enumerate(results)
    ]
    prompt = prompt_json(first.prompt) if first.prompt is not None else None
    body = GenerateResponse.model_validate(
        {**choices[0], "prompt_logprobs": prompt, "choices": choices if len(choices) > 1 else None}
    )
    return Response(body)


def client_gone() -> Response[Any]:
    """The answer to a request whose client has left: nobody reads it but the access log
    (499, as nginx logs a client that closed its request)."""
    error = Rendered(499, "client_disconnected", "the client closed the request")
    return Response(error.body(), status_code=error.status)


@dataclass
class Collected:
    """A whole generation (one choice of it), for a JSON answer."""

    finished: DoneEvent | None = None
    pieces: list[str] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # where each token's text begins

    @property
    def done(self) -> DoneEvent:
        assert self.finished is not None  # `collect` returns finished generations only
        return self.finished

    @property
    def text(self) -> str:
        return "".join(self.pieces)


async def collect_choices(
    events: AsyncGenerator[Event, None],
    request: Request[Any, Any, Any],
    stop: Callable[[], object],
) -> list[Collected] | None:
    """`collect`, for a call of one or more choices: each one's generation, in order."""
    results = await collect(events, request, stop)
    if results is None:
        return None
    return [results[key] for key in sorted(results, key=lambda k: k or 0)]


async def collect(
    events: AsyncGenerator[Event, None], request: Request[Any, Any, Any], stop: Callable[[], object]
) -> dict[int | None, Collected] | None:
    """The rest of a generation's events, gathered for one JSON answer.

    A client that disconnects before the answer is ready stops the generation within a
    step (`stop`), as a streaming client does: what completed is saved to the session
    and the slot is freed, instead of generating max_tokens for nobody. Returns None
    then. The generation still ends on its own terms (saved, unlocked, counted once).
    """
    gone = False

    async def watch() -> None:
        nonlocal gone
        # the body is read already: the next message is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        stop()

    watcher = asyncio.create_task(watch())
    parts: dict[int | None, Collected] = {}  # by choice (None: a call of one)
    try:
        async for event in events:  # to the end, so the generation's own clean-up runs now
            if isinstance(event, TokenEvent):
                part = parts.setdefault(event.choice, Collected())
                part.pieces.append(event.text)
                part.offsets.extend(event.offsets)
                part.logprobs.extend(event.logprobs or ())
            elif isinstance(event, DoneEvent):
                parts.setdefault(event.choice, Collected()).finished = event
    finally:
        watcher.cancel()
    if gone:
        return None
    if not parts or any(part.finished is None for part in parts.values()):
        raise RuntimeError("the generation ended without a done event")
    return parts


def _info(runtime: ServiceState, session_id: str, state: SessionState) -> SessionInfo:
    generation = runtime.service()
    return SessionInfo(
        session_id=session_id,
        model=state.model,
        tokens=state.n_tokens,
        pending_token=state.pending >= 0,
        rewind_points=len(state.history),
        created=state.created,
        last_used=state.last_used,
        expires_at=generation.sessions.expires_at(state),
    )


@post(
    "/v1/sessions",
    status_code=HTTP_201_CREATED,
    summary="Create a session, fresh or from an exported state",
    responses=errors(400, 413, 422, 503),
)
async def create_session(
    data: SessionCreate, state: State, request: Request[Any, Any, Any]
) -> SessionInfo:
    runtime = runtime_of(state)
    sessions = runtime.service().sessions
    owner = owner_of(request)
    imported = None if data.state is None else sessions.unseal(data.state, owner)
    session_id, session = await sessions.create(owner, imported)
    return _info(runtime, session_id, session)


@post(
    "/v1/sessions/{session_id:str}/fork",
    status_code=HTTP_201_CREATED,
    summary="Fork a session: a new session with the same state, nothing re-read",
    description="The fork starts from the session's last saved state (a generation running "
    "on it is not waited for) and keeps its rewind points.",
    responses=errors(404, 409, 503),
)
async def fork_session(
    session_id: str, state: State, request: Request[Any, Any, Any]
) -> SessionInfo:
    runtime = runtime_of(state)
    fork_id, fork = await runtime.service().sessions.fork(session_id, owner_of(request))
    return _info(runtime, fork_id, fork)


@post(
    "/v1/sessions/{session_id:str}/rewind",
    status_code=HTTP_200_OK,
    summary="Undo a session's last calls",
    description="Restores the state from before the last `turns` calls. Each session keeps "
    "the start of its last `session_history` calls (409 beyond them, or while it "
    "generates).",
    responses=errors(400, 404, 409, 413, 422, 503),
)
async def rewind_session(
    session_id: str, data: RewindRequest, state: State, request: Request[Any, Any, Any]
) -> SessionInfo:
    runtime = runtime_of(state)
    session = await runtime.service().sessions.rewind(session_id, owner_of(request), data.turns)
    return _info(runtime, session_id, session)


@get(
    "/v1/sessions/{session_id:str}/next",
    summary="Peek at the next-word distribution without advancing the session",
    description="The `top` most likely next words with their log-probabilities, at "
    "temperature 1 unless `temperature` is given (no top-k or top-p). Greedy generation "
    "from the session then starts with the first of them. 409 for a session with no "
    "context yet.",
    responses=errors(400, 404, 409, 422, 503),
)
async def peek_session(
    session_id: str,
    state: State,
    request: Request[Any, Any, Any],
    top: Annotated[int, Parameter(ge=1, le=MAX_INT32, description="How many words.")] = 5,
    temperature: Annotated[
        float, Parameter(ge=MIN_TEMPERATURE, le=100.0, description="softmax(logits / T).")
    ] = 1.0,
) -> NextWords:
    runtime = runtime_of(state)
    limit = runtime.limits.max_logprobs
    if top > limit:
        raise InvalidRequest(f"top must be between 1 and {limit}", "top")
    generation = runtime.service()
    bias = logit_bias_of(None, runtime.limits)  # the [UNK] ban, when the server bans it
    session, words = await generation.peek(session_id, owner_of(request), top, temperature, bias)
    vocab = generation.tokenizer.vocab
    return NextWords(
        session_id=session_id,
        tokens=session.n_tokens,
        temperature=temperature,
        top=[
            NextWord(token=vocab[int(i)], id=int(i), logprob=float(lp), prob=math.exp(lp))
            for i, lp in zip(words.ids, words.logprobs, strict=True)
        ],
    )


@get(
    "/v1/sessions/{session_id:str}/state",
    summary="Export a session's signed state",
    responses=errors(404, 409, 503),
)
async def export_session(
    session_id: str, state: State, request: Request[Any, Any, Any]
) -> SessionStateExport:
    runtime = runtime_of(state)
    sessions = runtime.service().sessions
    session = await sessions.load(session_id, owner_of(request))
    return SessionStateExport(
        session_id=session_id, model=sessions.model.version, state=sessions.seal(session)
    )


@get("/v1/sessions/{session_id:str}", summary="Session metadata", responses=errors(404, 409, 503))
async def get_session(
    session_id: str, state: State, request: Request[Any, Any, Any]
) -> SessionInfo:
    runtime = runtime_of(state)
    session = await runtime.service().sessions.load(session_id, owner_of(request))
    return _info(runtime, session_id, session)


@delete(
    "/v1/sessions/{session_id:str}",
    status_code=HTTP_204_NO_CONTENT,
    summary="Delete a session",
    responses=errors(404, 409, 503),
)
async def delete_session(session_id: str, state: State, request: Request[Any, Any, Any]) -> None:
    await runtime_of(state).service().sessions.delete(session_id, owner_of(request))


@get(
    "/healthz",
    summary="Liveness: the process is up and its engine worker is alive and stepping",
    description="503 once the engine worker has died, or has made no step while work waited "
    "longer than `engine_stall_s`: restarting the process is then the way out.",
)
async def healthz(state: State) -> Response[dict[str, str]]:
    problem = runtime_of(state).engine_problem()
    if problem is not None:
        return Response({"status": "failing", "reason": problem}, status_code=503)
    return Response({"status": "ok"}, status_code=200)


@get("/readyz", summary="Readiness: model loaded, warmed up, engine stepping, store reachable")
async def readyz(state: State) -> Response[dict[str, Any]]:
    runtime = runtime_of(state)
    store_ok = runtime.store is not None and await runtime.store.ping()
    generation = runtime.generation
    draining = generation is not None and generation.draining
    engine_problem = runtime.engine_problem()
    tasks = runtime.supervisor.problems() if runtime.supervisor is not None else {}
    ready = runtime.ready and store_ok and not draining and engine_problem is None and not tasks
    body: dict[str, Any] = {
        "status": "ready" if ready else "not_ready",
        "model_loaded": runtime.ready,
        "store": runtime.settings.store,
        "store_ok": store_ok,
        "draining": draining,
        "engine": engine_problem or "ok",
    }
    if tasks:
        body["failing_tasks"] = tasks
    if runtime.engine is not None and generation is not None:
        body["load"] = {
            "generations": generation.active,
            "running": runtime.engine.num_running,
            "waiting": runtime.engine.num_waiting,
            "free_slots": runtime.engine.free_slots,
            "websockets": len(runtime.websockets),
        }
    if runtime.model is not None and runtime.bundle is not None:
        body["provider"] = runtime.model.provider
        body["model"] = {"name": runtime.bundle.name, "version": runtime.bundle.version}
    return Response(body, status_code=200 if ready else 503)


@get("/metrics", summary="Prometheus metrics", media_type=CONTENT_TYPE_LATEST)
async def metrics(state: State) -> Response[bytes]:
    runtime = runtime_of(state)
    m = runtime.metrics
    if runtime.engine is not None:
        m.requests_running.set(runtime.engine.num_running)
        m.requests_waiting.set(runtime.engine.num_waiting)
    if runtime.store is not None:
        with contextlib.suppress(Exception):  # the store being down must not break scraping
            m.sessions_active.set(await runtime.store.len())
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
