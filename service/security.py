"""API keys and per-key rate limits, as one ASGI middleware in front of /v1/*.

Keys are compared in constant time against every configured key, and only a short
fingerprint of the matching key travels further (as the session owner); the key itself
is never logged or counted. Rate limits are token buckets per key (per client address
when keys are off) and answer 429 with Retry-After.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import parse_qs

from litestar.enums import ScopeType
from litestar.types import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    WebSocketAcceptEvent,
    WebSocketCloseEvent,
    WebSocketSendEvent,
)

from service.errors import RateLimited, Rendered, Unauthorized, render
from service.routes.frames import encode

PROTECTED_PREFIX = "/v1/"
_QUERY_KEY = re.compile(r"(api_key=)[^&\s\"']+")


class RedactKeys(logging.Filter):
    """Blanks `api_key=...` in log lines (the ASGI server logs WebSocket URLs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "api_key=" in message:
            record.msg = _QUERY_KEY.sub(r"\1***", message)
            record.args = None
        return True


def redact_server_logs(*logger_names: str) -> None:
    for name in logger_names:
        logging.getLogger(name).addFilter(RedactKeys())


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class KeyRing:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def match(self, presented: str | None) -> str | None:
        """The fingerprint of the matching key, or None. Checks every key, whatever matches."""
        if presented is None:
            return None
        candidate = presented.encode()
        found: bytes | None = None
        for key in self._keys:
            if hmac.compare_digest(candidate, key):
                found = key
        return fingerprint(found.decode()) if found is not None else None


class RateLimiter:
    """Token buckets: `rate` per second, up to `burst` at once, for at most `max_keys` keys."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, identity: str, now: float | None = None) -> float:
        """0 when allowed, else the seconds until a request would be."""
        now = time.monotonic() if now is None else now
        tokens, stamp = self._buckets.pop(identity, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - stamp) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[identity] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def presented_key(scope: Scope) -> str | None:
    auth = _header(scope, b"authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None
    if scope["type"] == ScopeType.WEBSOCKET:  # browsers cannot set headers on a WebSocket
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        values = query.get("api_key")
        return values[0] if values else None
    return None


class AccessMiddleware:
    """Authenticates /v1/* (and /metrics when asked), then applies the rate limit."""

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing,
        limiter: RateLimiter | None,
        protect_metrics: bool,
        on_reject: Any = None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.protect_metrics = protect_metrics
        self.on_reject = on_reject

    def _protected(self, path: str) -> bool:
        return path.startswith(PROTECTED_PREFIX) or (self.protect_metrics and path == "/metrics")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in (ScopeType.HTTP, ScopeType.WEBSOCKET) or not self._protected(
            scope["path"]
        ):
            await self.app(scope, receive, send)
            return
        owner = ""
        if self.keys.enabled:
            match = self.keys.match(presented_key(scope))
            if match is None:
                await self._reject(
                    scope,
                    receive,
                    send,
                    render(
                        Unauthorized("a valid API key is required: Authorization: Bearer <key>")
                    ),
                )
                return
            owner = match
        if self.limiter is not None and scope["path"].startswith(PROTECTED_PREFIX):
            client = scope.get("client") or ("unknown", 0)
            wait = self.limiter.take(owner or f"addr:{client[0]}")
            if wait > 0:
                retry = max(1, math.ceil(wait))
                await self._reject(
                    scope,
                    receive,
                    send,
                    render(
                        RateLimited(
                            f"too many requests; retry in {retry} s",
                            headers={"Retry-After": str(retry)},
                        )
                    ),
                )
                return
        scope["simmer_owner"] = owner  # type: ignore[typeddict-unknown-key]
        await self.app(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, error: Rendered) -> None:
        if self.on_reject is not None:
            self.on_reject(error.code)
        if scope["type"] == ScopeType.WEBSOCKET:
            # Browsers see nothing of a refused handshake, so accept, say why in an error
            # event, and close with 4000 + the HTTP status.
            await receive()  # websocket.connect
            accept: WebSocketAcceptEvent = {
                "type": "websocket.accept",
                "subprotocol": None,
                "headers": [],
            }
            await send(accept)
            event = error.event()
            said: WebSocketSendEvent = {
                "type": "websocket.send",
                "bytes": None,
                "text": encode(event).decode(),
            }
            await send(said)
            close: WebSocketCloseEvent = {
                "type": "websocket.close",
                "code": 4000 + error.status,
                "reason": error.code,
            }
            await send(close)
            return
        body = encode(error.body())
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        start: Message = {"type": "http.response.start", "status": error.status, "headers": headers}
        await send(start)
        end: Message = {"type": "http.response.body", "body": body, "more_body": False}
        await send(end)
