"""create_app(settings): the Litestar app, its routes, middleware and error handlers.

What the app opens while it runs (the model, the engine, the store) opens in its
lifespan (`service.lifespan.serving`); readiness turns true only after a warm-up step.
Every error becomes one JSON shape here: domain errors through the table in
`service.errors`, Litestar's and pydantic's own in the same shape.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.exceptions import HTTPException, ValidationException
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler, ExceptionHandlersMap
from pydantic import ValidationError

from service.errors import INTERNAL, DomainError, Rendered, render
from service.lifespan import serving
from service.metrics import Metrics
from service.openapi import complete_openapi
from service.protocol import Limits, invalid_field, invalid_request_of
from service.routes import chat, http, openai, ws
from service.security import AccessMiddleware, KeyRing, RateLimiter
from service.settings import Settings
from service.state import ServiceState
from simmer.bundle import ModelBundle

logger = logging.getLogger("simmer")
STATIC = Path(__file__).parent / "static"

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


def _answer(request: Request[Any, Any, Any], error: Rendered) -> Response[dict[str, Any]]:
    """The one error answer; every /v1/ failure is counted by its code."""
    runtime: ServiceState | None = getattr(request.app.state, "runtime", None)
    if runtime is not None and request.url.path.startswith("/v1/"):
        runtime.metrics.failure(error.code)
    return Response(error.body(), status_code=error.status, headers=error.headers or None)


def handle_domain(request: Request[Any, Any, Any], exc: DomainError) -> Response[dict[str, Any]]:
    return _answer(request, render(exc))


def handle_validation(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[dict[str, Any]]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    if not extra:  # Litestar's own 400s: an unreadable body
        return _answer(request, Rendered(400, "bad_request", str(exc.detail)))
    param = first.get("key") or None
    return _answer(request, render(invalid_field(param, str(first.get("message") or exc.detail))))


def handle_pydantic(
    request: Request[Any, Any, Any], exc: ValidationError
) -> Response[dict[str, Any]]:
    return _answer(request, render(invalid_request_of(exc)))


def handle_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    status = exc.status_code
    code = _STATUS_CODES.get(status, "error")
    return _answer(request, Rendered(status, code, str(exc.detail), None, dict(exc.headers or {})))


def handle_internal(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return _answer(request, INTERNAL)


@get("/", include_in_schema=False, media_type="text/html")
async def playground() -> Response[bytes]:
    page = STATIC / "index.html"
    return Response(page.read_bytes(), media_type="text/html; charset=utf-8")


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="simmer",
        version="0.1.0",
        description="Stateful streaming generation with the book's recipe LSTM.",
        path="/schema",
        render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
    )


ROUTES: list[ControllerRouterHandler] = [
    playground,
    http.generate,
    http.create_session,
    http.get_session,
    http.delete_session,
    http.export_session,
    http.fork_session,
    http.rewind_session,
    http.peek_session,
    http.healthz,
    http.readyz,
    http.metrics,
    ws.stream,
    openai.completions,
    openai.models,
    openai.vocab,
    chat.chat_completions,
    create_static_files_router(path="/static", directories=[STATIC], include_in_schema=False),
]

ERROR_HANDLERS: ExceptionHandlersMap = {
    DomainError: handle_domain,
    ValidationException: handle_validation,
    ValidationError: handle_pydantic,
    HTTPException: handle_http,
    Exception: handle_internal,
}


def access_policy(settings: Settings, metrics: Metrics) -> dict[str, Any]:
    """`AccessMiddleware`'s arguments: API keys and rate limits, in front of every route.
    The app keeps them (`app.state.access`) for the stream, which the server serves past
    Litestar (`ws.with_stream`) with the same keys and the same buckets."""
    limiter = (
        RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
        if settings.rate_limit_per_s > 0
        else None
    )
    return {
        "keys": KeyRing(settings.all_api_keys()),
        "limiter": limiter,
        "protect_metrics": settings.metrics_require_key,
        "on_reject": metrics.failure,
    }


def create_app(settings: Settings | None = None, bundle: ModelBundle | None = None) -> Litestar:
    """Build the app. `bundle`, when given, is an already verified bundle to serve."""
    settings = settings or Settings()
    metrics = Metrics(enabled=settings.metrics_enabled)
    runtime = ServiceState(
        settings=settings,
        metrics=metrics,
        limits=Limits(
            max_new_tokens=settings.max_new_tokens,
            max_logprobs=settings.max_logprobs,
            default_max_tokens=settings.default_max_tokens,
            ban_unk=settings.ban_unk,
        ),
    )
    if settings.state_secret:
        runtime.state_secret = settings.state_secret.encode()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with serving(runtime, bundle):
            yield

    access = access_policy(settings, metrics)
    app = Litestar(
        route_handlers=ROUTES,
        lifespan=[lifespan],
        middleware=[DefineMiddleware(AccessMiddleware, **access)],
        exception_handlers=ERROR_HANDLERS,
        openapi_config=openapi_config(),
        request_max_body_size=settings.max_body_bytes,
        debug=False,
    )
    complete_openapi(app, settings)
    app.state.runtime = runtime
    app.state.access = access
    return app
