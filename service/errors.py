"""Domain errors, and the one table that maps them to HTTP.

The engine, the sessions and the generation service raise these exceptions and know
nothing of HTTP. `HTTP_ERRORS` gives each its status, code and headers; every route
and transport renders them the same way:

{"error": {"code": "session_not_found", "message": "...", "param": "session_id"}}

(and on a WebSocket or inside a stream, {"type": "error", "code", "message", "param"}).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class DomainError(Exception):
    """A failure explained to the client; `param` names the field at fault, if any, and
    `headers` adds to the table's (a Retry-After that depends on the case, say)."""

    def __init__(
        self, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class Unauthorized(DomainError):
    """No API key, or a wrong one (401)."""


class RateLimited(DomainError):
    """Too many requests for this key (429)."""


class InvalidRequest(DomainError):
    """A field has a value that cannot be served (422)."""


class InvalidState(DomainError):
    """A signed session state that does not verify or does not fit (400)."""


class StateModelMismatch(InvalidState):
    """A signed session state made by another model (400)."""


class SessionNotFound(DomainError):
    """Never existed, deleted, expired, or another key's (404)."""


class ModelNotFound(DomainError):
    """A model this server does not serve (404)."""


class SessionBusy(DomainError):
    """The session is generating already (409)."""


class RewindTooFar(DomainError):
    """A rewind past the calls a session keeps (409)."""


class NothingToPredict(DomainError):
    """A session with no context yet has no next word to show (409)."""


class SessionModelMismatch(DomainError):
    """The session belongs to another model version (409)."""


class SessionLockLost(DomainError):
    """The call lost its session's lock before it could save (409)."""


class EngineFailed(DomainError):
    """The engine failed the step this generation was in (500)."""


class Overloaded(DomainError):
    """No room for another generation now (503)."""


class ShuttingDown(DomainError):
    """This replica is draining (503)."""


class NotReady(DomainError):
    """The model is still loading (503)."""


class EngineUnavailable(DomainError):
    """The engine worker is gone; this replica cannot generate (503)."""


class StoreUnavailable(DomainError):
    """The session store cannot be reached (503)."""


@dataclass(frozen=True)
class HTTPAnswer:
    status: int
    code: str
    headers: dict[str, str] | None = None


RETRY = {"Retry-After": "1"}

HTTP_ERRORS: dict[type[DomainError], HTTPAnswer] = {
    Unauthorized: HTTPAnswer(401, "unauthorized", {"WWW-Authenticate": "Bearer"}),
    RateLimited: HTTPAnswer(429, "rate_limited"),
    InvalidRequest: HTTPAnswer(422, "invalid_request"),
    InvalidState: HTTPAnswer(400, "invalid_state"),
    StateModelMismatch: HTTPAnswer(400, "state_model_mismatch"),
    SessionNotFound: HTTPAnswer(404, "session_not_found"),
    ModelNotFound: HTTPAnswer(404, "model_not_found"),
    SessionBusy: HTTPAnswer(409, "session_busy"),
    SessionModelMismatch: HTTPAnswer(409, "session_model_mismatch"),
    RewindTooFar: HTTPAnswer(409, "rewind_too_far"),
    NothingToPredict: HTTPAnswer(409, "session_empty"),
    SessionLockLost: HTTPAnswer(409, "session_lock_lost"),
    EngineFailed: HTTPAnswer(500, "engine_error"),
    Overloaded: HTTPAnswer(503, "overloaded", RETRY),
    ShuttingDown: HTTPAnswer(503, "shutting_down", RETRY),
    NotReady: HTTPAnswer(503, "not_ready", RETRY),
    EngineUnavailable: HTTPAnswer(503, "engine_unavailable", RETRY),
    StoreUnavailable: HTTPAnswer(503, "store_unavailable", RETRY),
}


def http_error(exc: DomainError) -> HTTPAnswer:
    """The table's entry for `exc`: its own class's, else its nearest base's."""
    for kind in type(exc).__mro__:
        if kind in HTTP_ERRORS:
            return HTTP_ERRORS[kind]
    return HTTPAnswer(500, "internal_error")


@dataclass(frozen=True)
class Rendered:
    """An error as every transport says it."""

    status: int
    code: str
    message: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.param)

    def event(self) -> dict[str, Any]:
        return error_event(self.code, self.message, self.param)


INTERNAL = Rendered(500, "internal_error", "internal server error")  # a bug, said plainly


def render(exc: DomainError) -> Rendered:
    entry = http_error(exc)
    headers = {**(entry.headers or {}), **exc.headers}
    return Rendered(entry.status, entry.code, exc.message, exc.param, headers)


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """The one error shape of every HTTP answer."""
    error: dict[str, Any] = {"code": code, "message": message}
    if param is not None:
        error["param"] = param
    return {"error": error}


def error_event(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """The same error as an event in a stream or on a WebSocket."""
    return {"type": "error", **error_body(code, message, param)["error"]}


def session_not_found(session_id: str, ttl_s: float) -> SessionNotFound:
    return SessionNotFound(
        f"session {session_id!r} not found: it never existed, was deleted, or expired "
        f"after {ttl_s:g} s idle",
        "session_id",
    )


def session_expired(session_id: str, ttl_s: float) -> SessionNotFound:
    return SessionNotFound(f"session {session_id!r} expired after {ttl_s:g} s idle", "session_id")
