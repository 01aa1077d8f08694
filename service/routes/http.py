"""simmer's own HTTP API: generate (JSON or SSE), sessions, probes and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from litestar import Request, Response, delete, get, post
from litestar.background_tasks import BackgroundTask
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.response import Stream
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import INTERNAL, DomainError, Rendered, render
from service.generation.events import DoneEvent, Event, Logprob, SessionEvent, TokenEvent
from service.protocol import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    SessionCreate,
    SessionInfo,
    SessionStateExport,
)
from service.routes.frames import done_json, logprobs_json, sse, token_json, usage_json
from service.sessions.portable import seal, unseal
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


async def sse_stream(
    first: Event, events: AsyncGenerator[Event, None], on_error: Callable[[str], None]
) -> AsyncGenerator[bytes, None]:
    """`data: {json}` lines; always closes the generation, even when the client leaves.

    An error after the stream has begun (the engine failing, say) is one error event,
    counted with `on_error`, and then the end of the stream."""
    try:
        if isinstance(first, SessionEvent):
            yield sse({"type": "session", "session_id": first.session_id})
        async for event in events:
            if isinstance(event, TokenEvent):
                yield sse(token_json(event))
            elif isinstance(event, DoneEvent):
                await events.aclose()  # unlock the session before the client can reuse it
                yield sse(done_json(event))
    except DomainError as exc:
        error = render(exc)
        on_error(error.code)
        yield sse(error.event())
    except Exception:  # a bug: the client still gets an error event and the stream ends
        logger.exception("stream failed")
        on_error(INTERNAL.code)
        yield sse(INTERNAL.event())
    finally:
        await events.aclose()


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
    params = data.to_generation(runtime.limits)
    events = runtime.service().generate(params, owner_of(request))
    first = await anext(events)  # bad input raises here, before any byte is sent
    if data.stream:
        return event_stream(sse_stream(first, events, runtime.metrics.failure))
    assert isinstance(first, SessionEvent)
    result = await collect(events, request, runtime.service().stopper(first.session_id))
    if result is None:
        return client_gone()
    body = GenerateResponse.model_validate(
        {
            "session_id": first.session_id,
            "text": result.text,
            "finish_reason": result.done.finish_reason,
            "usage": usage_json(result.done),
            "logprobs": logprobs_json(result.logprobs) if params.sampling.logprobs else None,
        }
    )
    return Response(body)


def client_gone() -> Response[Any]:
    """The answer to a request whose client has left: nobody reads it but the access log
    (499, as nginx logs a client that closed its request)."""
    error = Rendered(499, "client_disconnected", "the client closed the request")
    return Response(error.body(), status_code=error.status)


@dataclass
class Collected:
    """A whole generation, for a JSON answer."""

    done: DoneEvent
    pieces: list[str] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # where each token's text begins

    @property
    def text(self) -> str:
        return "".join(self.pieces)


async def collect(
    events: AsyncGenerator[Event, None], request: Request[Any, Any, Any], stop: Callable[[], object]
) -> Collected | None:
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
    pieces: list[str] = []
    logprobs: list[Logprob] = []
    offsets: list[int] = []
    done: DoneEvent | None = None
    try:
        async for event in events:  # to the end, so the generation's own clean-up runs now
            if isinstance(event, TokenEvent):
                pieces.append(event.text)
                offsets.extend(event.offsets)
                logprobs.extend(event.logprobs or ())
            elif isinstance(event, DoneEvent):
                done = event
    finally:
        watcher.cancel()
    if gone:
        return None
    if done is None:
        raise RuntimeError("the generation ended without a done event")
    return Collected(done, pieces, logprobs, offsets)


def _info(runtime: ServiceState, session_id: str, state: Any) -> SessionInfo:
    generation = runtime.service()
    return SessionInfo(
        session_id=session_id,
        model=state.model,
        tokens=state.n_tokens,
        pending_token=state.pending >= 0,
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
    generation = runtime.service()
    imported = None
    if data.state is not None:
        imported = unseal(
            data.state,
            runtime.state_secret,
            generation.model.version,
            generation.model.num_layers,
            generation.model.hidden_size,
        )
    session_id, session = await generation.sessions.create(owner_of(request), imported)
    return _info(runtime, session_id, session)


@get(
    "/v1/sessions/{session_id:str}/state",
    summary="Export a session's signed state",
    responses=errors(404, 409, 503),
)
async def export_session(
    session_id: str, state: State, request: Request[Any, Any, Any]
) -> SessionStateExport:
    runtime = runtime_of(state)
    generation = runtime.service()
    session = await generation.sessions.load(session_id, owner_of(request))
    blob = seal(session, runtime.state_secret, generation.model.version)
    return SessionStateExport(session_id=session_id, model=generation.model.version, state=blob)


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
