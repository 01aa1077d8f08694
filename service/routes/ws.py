"""WS /v1/stream: one connection is one session.

Client messages: {"type": "generate", ...the /v1/generate fields...} and
{"type": "cancel"}. Server messages: {"type": "session", "session_id"}, then token
events, then a done event; {"type": "error", "code", "message"} for anything wrong.
Sequential generate messages continue the connection's session. A cancel ends the
generation within one engine step; a client that disconnects frees its slot at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable
from typing import Any

from litestar import Litestar, WebSocket, websocket
from litestar.enums import ScopeType
from litestar.exceptions import WebSocketDisconnect
from litestar.types import ASGIApp, Receive, Scope, Send
from pydantic import ValidationError

from service.errors import INTERNAL, DomainError, InvalidRequest, Rendered, SessionBusy, render
from service.generation.events import DoneEvent, SessionEvent, TokenEvent
from service.protocol import WSGenerate, invalid_request_of
from service.routes.frames import done_json, encode, session_json, token_json
from service.routes.http import runtime_of
from service.security import AccessMiddleware
from service.state import ServiceState

logger = logging.getLogger(__name__)


STREAM_PATH = "/v1/stream"


def with_stream(app: Litestar) -> ASGIApp:
    """`app`, with WS /v1/stream served past Litestar, behind the same access control.

    Litestar's router, connection object, exception middleware and send wrappers are
    per-connection work the stream uses none of: the bare protocol of `bench.bare`
    served from a Litestar route instead cost 480 to 590 us of CPU for a one-token
    generation on its own connection, against 240 to 300 us on uvicorn alone, and
    taking the stream past Litestar cut the service's from 767 to 698 us (medians of
    alternating runs). The handler is the one Litestar's route runs for in-process
    clients; here it gets the server's own receive and send, and the app's API keys
    and rate limiter.
    """
    runtime = runtime_of(app.state)

    async def stream_app(scope: Scope, receive: Receive, send: Send) -> None:
        await serve_stream(scope, receive, send, runtime)

    guarded = AccessMiddleware(stream_app, **app.state.access)

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        # Litestar's router would also check the Host header; nothing here reads it
        if scope["type"] == ScopeType.WEBSOCKET and scope["path"] == STREAM_PATH:
            await _closing_on_error(guarded(scope, receive, send), send, runtime)
        else:
            await app(scope, receive, send)

    return asgi


async def _closing_on_error(connection: Awaitable[None], send: Send, runtime: ServiceState) -> None:
    """Run one connection; a bug that escapes it is logged, counted as internal_error,
    and closes the socket with 1011, on either path to the handler."""
    try:
        await connection
    except Exception:
        logger.exception("WebSocket connection failed")
        runtime.metrics.failure(INTERNAL.code)
        with contextlib.suppress(Exception):
            await send({"type": "websocket.close", "code": 1011, "reason": INTERNAL.code})


class _ClientGone(Exception):
    """A message could not be sent: the client has closed the connection."""


class _Connection:
    def __init__(self, scope: Scope, send: Send, runtime: ServiceState) -> None:
        self._send = send
        self.runtime = runtime
        self.session_id: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.generating = False  # turns false before the done event is sent
        self.cancel_requested = False
        self.owner = str(scope.get("simmer_owner", ""))

    async def send(self, obj: dict[str, Any]) -> None:
        try:
            await self._send(
                {"type": "websocket.send", "bytes": None, "text": encode(obj).decode()}
            )
        except (OSError, WebSocketDisconnect) as exc:  # uvicorn's, and Litestar's wrapper's
            raise _ClientGone from exc

    async def error(self, error: Rendered) -> None:
        self.runtime.metrics.failure(error.code)
        with contextlib.suppress(Exception):
            await self.send(error.event())

    async def run_generation(self, message: WSGenerate) -> None:
        runtime = self.runtime
        created = False
        try:
            if self.session_id is not None:
                if message.session_id not in (None, self.session_id):
                    raise InvalidRequest(
                        "this connection holds a session already; open another connection",
                        "session_id",
                    )
                if message.state is not None:
                    raise InvalidRequest(
                        "this connection holds a session already; continue from a state "
                        "on a new connection",
                        "state",
                    )
                message = message.model_copy(update={"session_id": self.session_id})
            params = message.to_generation(runtime.limits)
            events = runtime.service().generate(params, self.owner)
            try:
                async for event in events:
                    if isinstance(event, SessionEvent):
                        self.session_id = event.session_id
                        created = event.created
                        if self.cancel_requested:
                            self.cancel()
                        await self.send(session_json(event))
                    elif isinstance(event, TokenEvent):
                        await self.send(token_json(event))
                    elif isinstance(event, DoneEvent):
                        self.generating = False  # the next message may continue at once
                        await self.send(done_json(event))
                        return
            finally:
                await events.aclose()
        except DomainError as exc:
            self._failed(created)
            await self.error(render(exc))
        except _ClientGone:
            # a message to a client that has just left: the service has stopped the
            # generation and saves what it kept, as for any client that goes away
            self._failed(created)
        except Exception:
            # anything else is a bug: the client hears of it, the connection stays usable
            logger.exception("WebSocket generation failed")
            self._failed(created)
            await self.error(INTERNAL)
        finally:
            self.generating = False

    def _failed(self, created: bool) -> None:
        """After a failed generation: a session that this call created was never saved,
        so the connection's next generate starts a new one."""
        self.generating = False
        if created:
            self.session_id = None

    def cancel(self) -> None:
        """Stop the running generation within one engine step."""
        generation = self.runtime.generation
        if self.session_id is not None and generation is not None:
            generation.cancel(self.session_id)

    def handle_text(self, text: str) -> WSGenerate | Rendered | None:
        """Parse one message: a generate message, None for a cancel, or the error to send."""
        limit = self.runtime.settings.max_ws_message_bytes
        if len(text.encode()) > limit:
            return Rendered(413, "message_too_large", f"messages are limited to {limit} bytes")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            return Rendered(400, "invalid_json", f"message is not valid JSON: {exc.msg}")
        if not isinstance(raw, dict):
            return render(InvalidRequest("message must be a JSON object"))
        kind = raw.get("type")
        if kind == "cancel":
            return None
        if kind != "generate":
            return render(InvalidRequest('type must be "generate" or "cancel"', "type"))
        try:
            return WSGenerate.model_validate(raw)
        except ValidationError as exc:
            return render(invalid_request_of(exc))


@websocket(STREAM_PATH)
async def stream(socket: WebSocket[Any, Any, Any]) -> None:
    """The Litestar route, for in-process clients; the server takes the stream past
    Litestar (`with_stream`)."""
    await serve_stream(socket.scope, socket.receive, socket.send, runtime_of(socket.app.state))


async def serve_stream(scope: Scope, receive: Receive, send: Send, runtime: ServiceState) -> None:
    """One WebSocket connection, from its connect message to its disconnect."""
    await _closing_on_error(_serve(scope, receive, send, runtime), send, runtime)


async def _serve(scope: Scope, receive: Receive, send: Send, runtime: ServiceState) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    try:
        await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
    except OSError:  # the client left during the handshake (uvicorn's ClientDisconnected)
        return
    conn = _Connection(scope, send, runtime)
    runtime.websockets.add(conn)
    runtime.metrics.websocket_connections.inc()
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if not isinstance(text, str):
                binary = "binary frames are not accepted; send JSON text"
                await conn.error(Rendered(400, "invalid_message", binary))
                continue
            payload = conn.handle_text(text)
            if isinstance(payload, Rendered):
                await conn.error(payload)
            elif payload is None:  # a cancel
                if conn.generating:
                    conn.cancel_requested = True
                    conn.cancel()
            elif conn.generating:
                busy = "a generation is already running on this connection"
                await conn.error(render(SessionBusy(busy)))
            else:
                if conn.task is not None:
                    await conn.task  # its done event is out; it is only closing up
                conn.cancel_requested = False
                conn.generating = True
                conn.task = asyncio.create_task(conn.run_generation(payload))
    finally:
        runtime.websockets.discard(conn)
        runtime.metrics.websocket_connections.dec()
        if conn.task is not None and not conn.task.done():
            conn.cancel()
            conn.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await conn.task
