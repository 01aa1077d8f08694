"""create_app(settings): the Litestar app, its lifespan, routes and error handlers.

The bundle's ONNX session, the scheduler task and the session store open in the
lifespan and close in its `finally`; readiness turns true only after a warm-up step.
"""

from __future__ import annotations

import asyncio
import functools
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
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Schema
from litestar.static_files import create_static_files_router
from pydantic import ValidationError

from service.engine import Engine
from service.errors import APIError
from service.generation import GenerationService
from service.metrics import Metrics
from service.protocol import REQUEST_MODELS, STRICT_REQUESTS, Limits
from service.routes import http, openai, ws
from service.runtime import Runtime
from service.scheduler import DecodeScheduler, StepStats
from service.security import AccessMiddleware, KeyRing, RateLimiter
from service.sessions import create_store, refresh_locks_forever, sweep_forever
from service.settings import Settings
from service.supervisor import Supervisor
from simmer.bundle import ModelBundle, load_bundle

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


def _error_response(
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[dict[str, Any]]:
    return Response(
        APIError(status, code, message, param).body(), status_code=status, headers=headers
    )


def _count_failure(request: Request[Any, Any, Any], code: str) -> None:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is not None and request.url.path.startswith("/v1/"):
        runtime.metrics.request_failure.labels(code=code).inc()


def handle_api_error(request: Request[Any, Any, Any], exc: APIError) -> Response[dict[str, Any]]:
    _count_failure(request, exc.code)
    return _error_response(exc.status, exc.code, exc.message, exc.param, exc.headers or None)


def handle_validation(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[dict[str, Any]]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    param = first.get("key") or None
    detail = first.get("message") or exc.detail
    if not extra:  # Litestar's own 400s: an unreadable body
        _count_failure(request, "bad_request")
        return _error_response(400, "bad_request", str(exc.detail))
    _count_failure(request, "invalid_request")
    message = f"{param}: {detail}" if param else str(detail)
    return _error_response(422, "invalid_request", message, param)


def handle_pydantic(
    request: Request[Any, Any, Any], exc: ValidationError
) -> Response[dict[str, Any]]:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    _count_failure(request, "invalid_request")
    return _error_response(422, "invalid_request", f"{param}: {first.get('msg')}", param)


def handle_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    status = exc.status_code
    code = _STATUS_CODES.get(status, "error")
    _count_failure(request, code)
    headers = dict(exc.headers or {})
    return _error_response(status, code, str(exc.detail), None, headers or None)


def handle_internal(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    _count_failure(request, "internal_error")
    return _error_response(500, "internal_error", "internal server error")


@get("/", include_in_schema=False, media_type="text/html")
async def playground() -> Response[bytes]:
    page = STATIC / "index.html"
    return Response(page.read_bytes(), media_type="text/html; charset=utf-8")


# one server-sent event, as clients parse it: `data` holds a JSON document
SSE_EVENT = Schema(
    type=OpenAPIType.OBJECT,
    properties={
        "data": Schema(type=OpenAPIType.STRING, description="JSON: a token, done or error event"),
        "event": Schema(type=OpenAPIType.STRING),
        "id": Schema(type=OpenAPIType.STRING),
        "retry": Schema(type=OpenAPIType.INTEGER),
    },
    required=["data"],
)


_BOUNDS = {
    "minimum": "minimum",
    "maximum": "maximum",
    "exclusiveMinimum": "exclusive_minimum",
    "exclusiveMaximum": "exclusive_maximum",
    "minLength": "min_length",
    "maxLength": "max_length",
    "minItems": "min_items",
    "maxItems": "max_items",
}


def _copy_bounds(source: dict[str, Any], target: Schema) -> None:
    """Copy the bounds of pydantic's JSON schema for a field onto Litestar's, branch by
    branch: Litestar drops the bounds inside `X | None` and other unions."""
    for key, attribute in _BOUNDS.items():
        if key in source:
            setattr(target, attribute, source[key])
    branches = source.get("anyOf") or source.get("oneOf") or []
    if target.one_of is not None and len(branches) == len(target.one_of):
        for branch, schema in zip(branches, target.one_of, strict=True):
            if isinstance(schema, Schema):
                _copy_bounds(branch, schema)
    if isinstance(source.get("items"), dict) and isinstance(target.items, Schema):
        _copy_bounds(source["items"], target.items)


def _complete_openapi(app: Litestar, settings: Settings) -> None:
    """What Litestar's generated document leaves out: closed request models, the limits
    that come from settings, and the SSE bodies."""
    schema = app.openapi_schema
    components = schema.components.schemas if schema.components else {}
    for model in STRICT_REQUESTS:
        if model.__name__ in components:
            components[model.__name__].additional_properties = False
    limits = {"max_tokens": settings.max_new_tokens, "logprobs": settings.max_logprobs}
    for model in REQUEST_MODELS:
        target = components.get(model.__name__)
        if target is None or target.properties is None:
            continue
        wanted = model.model_json_schema()["properties"]
        for field, prop in target.properties.items():
            if isinstance(prop, Schema) and field in wanted:
                _copy_bounds(wanted[field], prop)
                if field in limits:
                    for branch in prop.one_of or [prop]:
                        if isinstance(branch, Schema) and branch.type == OpenAPIType.INTEGER:
                            branch.maximum = limits[field]
                    prop.maximum = None
    for path in ("/v1/generate", "/v1/completions"):
        item = schema.paths.get(path) if schema.paths else None
        operation = item.post if item is not None else None
        if operation is None or operation.responses is None:
            continue
        ok = operation.responses.get("200")
        if isinstance(ok, OpenAPIResponse) and ok.content is not None:
            ok.content["text/event-stream"] = OpenAPIMediaType(schema=SSE_EVENT)


async def _open_bundle(given: ModelBundle | None, path: Path) -> ModelBundle:
    return given if given is not None else await asyncio.to_thread(load_bundle, path)


def create_app(settings: Settings | None = None, bundle: ModelBundle | None = None) -> Litestar:
    """Build the app. `bundle`, when given, is an already verified bundle to serve."""
    settings = settings or Settings()
    metrics = Metrics(enabled=settings.metrics_enabled)
    runtime = Runtime(
        settings=settings,
        metrics=metrics,
        limits=Limits(
            max_new_tokens=settings.max_new_tokens,
            max_logprobs=settings.max_logprobs,
            default_max_tokens=settings.default_max_tokens,
        ),
    )

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        supervisor = Supervisor(on_failure=lambda name: metrics.task_failures.labels(name).inc())
        runtime.supervisor = supervisor
        loaded = await _open_bundle(bundle, settings.bundle)
        engine = await asyncio.to_thread(
            Engine, loaded, settings.providers, settings.intra_op_threads
        )
        store = create_store(
            settings.store,
            ttl_s=settings.session_ttl_s,
            max_sessions=settings.max_sessions,
            redis_url=settings.redis_url,
            prefix=settings.redis_prefix,
            on_evict=metrics.on_evict,
            lock_ttl_s=settings.session_lock_ttl_s,
        )

        def on_step(stats: StepStats) -> None:
            metrics.batch_size.observe(stats.batch_size)
            metrics.engine_step.observe(stats.seconds)

        scheduler = DecodeScheduler(
            engine,
            max_batch=settings.max_batch,
            on_step=on_step,
            on_admit=metrics.queue_time.observe,
            max_stride=settings.max_coalesce_steps,
            on_failure=metrics.engine_failures.inc,
        )
        runtime.bundle, runtime.engine, runtime.store, runtime.scheduler = (
            loaded,
            engine,
            store,
            scheduler,
        )
        generation = runtime.generation = GenerationService(
            scheduler,
            store,
            loaded.tokenizer,
            metrics,
            model_version=loaded.version,
            num_layers=engine.num_layers,
            hidden_size=engine.hidden_size,
            max_prompt_tokens=settings.max_prompt_tokens,
            session_ttl_s=settings.session_ttl_s,
            max_batch=settings.max_batch,
            max_waiting=settings.max_waiting,
        )
        metrics.model_info.info(
            {
                "name": loaded.name,
                "version": loaded.version,
                "bundle_sha256": loaded.model_hash,
                "provider": engine.provider,
            }
        )
        try:
            scheduler.start()
            # the largest batch too, so memory reaches its working size before traffic
            await asyncio.to_thread(engine.warm_up, (1, 8, settings.max_batch))
            supervisor.start(
                "session_sweeper",
                functools.partial(sweep_forever, store, min(60.0, settings.session_ttl_s / 4)),
            )
            supervisor.start(
                "engine_watchdog",
                functools.partial(scheduler.watch_worker, min(1.0, settings.engine_stall_s / 4)),
            )
            supervisor.start(
                "lock_refresher",
                lambda: refresh_locks_forever(
                    store,
                    generation.held_sessions,
                    generation.cancel,
                    settings.session_lock_ttl_s,
                    settings.session_lock_refresh_s,
                ),
            )
            runtime.ready = True
            logger.info(
                "serving %s %s on %s with the %s store",
                loaded.name,
                loaded.version,
                engine.provider,
                settings.store,
            )
            yield
        finally:
            runtime.ready = False
            await supervisor.close()
            await scheduler.close()
            await store.close()

    openapi = OpenAPIConfig(
        title="simmer",
        version="0.1.0",
        description="Stateful streaming generation with the book's recipe LSTM.",
        path="/schema",
        render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
    )
    keys = KeyRing(settings.all_api_keys())
    limiter = (
        RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
        if settings.rate_limit_per_s > 0
        else None
    )
    access = DefineMiddleware(
        AccessMiddleware,
        keys=keys,
        limiter=limiter,
        protect_metrics=settings.metrics_require_key,
        on_reject=lambda code: metrics.request_failure.labels(code=code).inc(),
    )
    app = Litestar(
        route_handlers=[
            playground,
            http.generate,
            http.create_session,
            http.get_session,
            http.delete_session,
            http.export_session,
            http.healthz,
            http.readyz,
            http.metrics,
            ws.stream,
            openai.completions,
            openai.models,
            create_static_files_router(
                path="/static", directories=[STATIC], include_in_schema=False
            ),
        ],
        lifespan=[lifespan],
        middleware=[access],
        exception_handlers={
            APIError: handle_api_error,
            ValidationException: handle_validation,
            ValidationError: handle_pydantic,
            HTTPException: handle_http,
            Exception: handle_internal,
        },
        openapi_config=openapi,
        request_max_body_size=settings.max_body_bytes,
        debug=False,
    )
    _complete_openapi(app, settings)
    if settings.state_secret:
        runtime.state_secret = settings.state_secret.encode()
    app.state.runtime = runtime
    return app
