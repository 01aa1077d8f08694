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
from typing import Any

from litestar import WebSocket, websocket
from litestar.datastructures import State
from pydantic import ValidationError

from service.errors import APIError
from service.events import done_json, encode, error_json, token_json
from service.generation import DoneEvent, SessionEvent, TokenEvent
from service.protocol import WSGenerate
from service.routes.http import runtime_of
from service.runtime import Runtime

logger = logging.getLogger(__name__)


class _Connection:
    def __init__(self, socket: WebSocket[Any, Any, Any], runtime: Runtime) -> None:
        self.socket = socket
        self.runtime = runtime
        self.session_id: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.generating = False  # turns false before the done event is sent
        self.cancel_requested = False
        self.owner = str(socket.scope.get("simmer_owner", ""))

    async def send(self, obj: dict[str, Any]) -> None:
        await self.socket.send_data(encode(obj).decode(), mode="text")

    async def error(self, code: str, message: str, param: str | None = None) -> None:
        self.runtime.metrics.request_failure.labels(code=code).inc()
        with contextlib.suppress(Exception):
            await self.send(error_json(code, message, param))

    async def run_generation(self, message: WSGenerate) -> None:
        runtime = self.runtime
        created = False
        try:
            if self.session_id is not None:
                if message.session_id not in (None, self.session_id):
                    raise APIError(
                        422,
                        "invalid_request",
                        "this connection holds a session already; open another connection",
                        "session_id",
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
                        await self.send({"type": "session", "session_id": event.session_id})
                    elif isinstance(event, TokenEvent):
                        await self.send(token_json(event))
                    elif isinstance(event, DoneEvent):
                        self.generating = False  # the next message may continue at once
                        await self.send(done_json(event))
                        return
            finally:
                await events.aclose()
        except APIError as exc:
            self._failed(created)
            await self.error(exc.code, exc.message, exc.param)
        except Exception:
            # anything else is a bug: the client hears of it, the connection stays usable
            logger.exception("WebSocket generation failed")
            self._failed(created)
            await self.error("internal_error", "internal server error")
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

    def handle_text(self, text: str) -> tuple[str, Any]:
        """Parse one message: ("generate", WSGenerate), ("cancel", None) or ("error", args)."""
        if len(text.encode()) > self.runtime.settings.max_ws_message_bytes:
            return "error", (
                "message_too_large",
                f"messages are limited to {self.runtime.settings.max_ws_message_bytes} bytes",
                None,
            )
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            return "error", ("invalid_json", f"message is not valid JSON: {exc.msg}", None)
        if not isinstance(raw, dict):
            return "error", ("invalid_request", "message must be a JSON object", None)
        kind = raw.get("type")
        if kind == "cancel":
            return "cancel", None
        if kind != "generate":
            return "error", ("invalid_request", 'type must be "generate" or "cancel"', "type")
        try:
            return "generate", WSGenerate.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            return "error", ("invalid_request", f"{param}: {first.get('msg')}", param)


@websocket("/v1/stream")
async def stream(socket: WebSocket[Any, Any, Any], state: State) -> None:
    runtime = runtime_of(state)
    await socket.accept()
    conn = _Connection(socket, runtime)
    runtime.websockets.add(conn)
    runtime.metrics.websocket_connections.inc()
    try:
        while True:
            message = await socket.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if not isinstance(text, str):
                await conn.error(
                    "invalid_message", "binary frames are not accepted; send JSON text"
                )
                continue
            kind, payload = conn.handle_text(text)
            if kind == "error":
                await conn.error(*payload)
            elif kind == "cancel":
                if conn.generating:
                    conn.cancel_requested = True
                    conn.cancel()
            elif conn.generating:
                await conn.error(
                    "session_busy", "a generation is already running on this connection"
                )
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
