"""The one error type the service raises; every route renders it the same way:

{"error": {"code": "session_not_found", "message": "...", "param": "session_id"}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class APIError(Exception):
    status: int
    code: str
    message: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(422, "invalid_request", message, param)


def session_not_found(session_id: str, ttl_s: float) -> APIError:
    return APIError(
        404,
        "session_not_found",
        f"session {session_id!r} not found: it never existed, was deleted, or expired "
        f"after {ttl_s:g} s idle",
        "session_id",
    )


def session_expired(session_id: str, ttl_s: float) -> APIError:
    return APIError(
        404,
        "session_not_found",
        f"session {session_id!r} expired after {ttl_s:g} s idle",
        "session_id",
    )


def overloaded(retry_after_s: int = 1) -> APIError:
    return APIError(
        503,
        "overloaded",
        "the server is at capacity; retry shortly",
        None,
        {"Retry-After": str(retry_after_s)},
    )


def store_unavailable(detail: str) -> APIError:
    return APIError(503, "store_unavailable", detail, None, {"Retry-After": "1"})


def engine_unavailable(detail: str) -> APIError:
    return APIError(503, "engine_unavailable", detail, None, {"Retry-After": "1"})
