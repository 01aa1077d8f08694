"""simmer's own HTTP API: generate (JSON or SSE), sessions, probes and metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from litestar import Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.response import Stream
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import APIError
from service.events import done_json, encode, error_json, logprobs_json, token_json, usage_json
from service.generation import DoneEvent, Event, SessionEvent, StepLogprobs, TokenEvent
from service.protocol import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    SessionCreate,
    SessionInfo,
)
from service.runtime import Runtime

ERRORS = {
    404: "session not found",
    409: "session busy",
    413: "request too large",
    422: "invalid request",
    503: "overloaded or not ready",
}


def owner_of(request: Request[Any, Any, Any]) -> str:
    return str(request.scope.get("simmer_owner", ""))


def runtime_of(state: State) -> Runtime:
    runtime: Runtime = state.runtime
    return runtime


async def sse_stream(first: Event, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    """`data: {json}` lines; always closes the generation, even when the client leaves."""
    try:
        if isinstance(first, SessionEvent):
            yield b"data: " + encode({"type": "session", "session_id": first.session_id}) + b"\n\n"
        async for event in events:
            if isinstance(event, TokenEvent):
                yield b"data: " + encode(token_json(event)) + b"\n\n"
            elif isinstance(event, DoneEvent):
                await events.aclose()  # unlock the session before the client can reuse it
                yield b"data: " + encode(done_json(event)) + b"\n\n"
    except APIError as exc:
        yield b"data: " + encode(error_json(exc.code, exc.message, exc.param)) + b"\n\n"
    finally:
        await events.aclose()


@post(
    "/v1/generate",
    status_code=HTTP_200_OK,
    summary="Generate text, continuing a session or starting one",
)
async def generate(
    data: GenerateRequest, state: State, request: Request[Any, Any, Any]
) -> Response[GenerateResponse] | Stream:
    runtime = runtime_of(state)
    params = data.to_generation(runtime.limits)
    events = runtime.service().generate(params, owner_of(request))
    first = await anext(events)  # bad input raises here, before any byte is sent
    if data.stream:
        return Stream(
            sse_stream(first, events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    assert isinstance(first, SessionEvent)
    pieces: list[str] = []
    logprobs: list[StepLogprobs] = []
    done: DoneEvent | None = None
    async for event in events:
        if isinstance(event, TokenEvent):
            pieces.append(event.text)
            if event.logprobs:
                logprobs.extend(event.logprobs)
        elif isinstance(event, DoneEvent):
            done = event
    assert done is not None
    body = GenerateResponse.model_validate(
        {
            "session_id": first.session_id,
            "text": "".join(pieces),
            "finish_reason": done.finish_reason,
            "usage": usage_json(done),
            "logprobs": logprobs_json(logprobs) if params.sampling.logprobs else None,
        }
    )
    return Response(body)


def _info(runtime: Runtime, session_id: str, state: Any) -> SessionInfo:
    generation = runtime.service()
    return SessionInfo(
        session_id=session_id,
        model=state.model,
        tokens=state.n_tokens,
        pending_token=state.pending >= 0,
        created=state.created,
        last_used=state.last_used,
        expires_at=generation.expires_at(state),
    )


@post("/v1/sessions", status_code=HTTP_201_CREATED, summary="Create a session")
async def create_session(
    state: State, request: Request[Any, Any, Any], data: SessionCreate | None = None
) -> SessionInfo:
    runtime = runtime_of(state)
    generation = runtime.service()
    session_id, session = await generation.create_session(owner_of(request))
    return _info(runtime, session_id, session)


@get("/v1/sessions/{session_id:str}", summary="Session metadata")
async def get_session(session_id: str, state: State, request: Request[Any, Any, Any]) -> SessionInfo:
    runtime = runtime_of(state)
    session = await runtime.service().load(session_id, owner_of(request))
    return _info(runtime, session_id, session)


@delete("/v1/sessions/{session_id:str}", status_code=HTTP_204_NO_CONTENT, summary="Delete a session")
async def delete_session(session_id: str, state: State, request: Request[Any, Any, Any]) -> None:
    await runtime_of(state).service().delete_session(session_id, owner_of(request))


@get("/healthz", summary="Liveness: the process is up", include_in_schema=True)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", summary="Readiness: model loaded, warmed up, store reachable")
async def readyz(state: State) -> Response[dict[str, Any]]:
    runtime = runtime_of(state)
    store_ok = runtime.store is not None and await runtime.store.ping()
    ready = runtime.ready and store_ok and not runtime.draining
    body: dict[str, Any] = {
        "status": "ready" if ready else "not_ready",
        "model_loaded": runtime.ready,
        "store": runtime.settings.store,
        "store_ok": store_ok,
        "draining": runtime.draining,
    }
    if runtime.engine is not None and runtime.bundle is not None:
        body["provider"] = runtime.engine.provider
        body["model"] = {"name": runtime.bundle.name, "version": runtime.bundle.version}
    return Response(body, status_code=200 if ready else 503)


@get("/metrics", summary="Prometheus metrics", media_type=CONTENT_TYPE_LATEST)
async def metrics(state: State) -> Response[bytes]:
    runtime = runtime_of(state)
    m = runtime.metrics
    if runtime.scheduler is not None:
        m.requests_running.set(runtime.scheduler.num_running)
        m.requests_waiting.set(runtime.scheduler.num_waiting)
    if runtime.store is not None:
        try:
            m.sessions_active.set(await runtime.store.len())
        except Exception:  # the store being down must not break scraping
            pass
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


__all__ = [
    "ERRORS",
    "ErrorResponse",
    "create_session",
    "delete_session",
    "generate",
    "get_session",
    "healthz",
    "metrics",
    "readyz",
]
