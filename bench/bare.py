"""The bare protocol server: simmer's WebSocket protocol with nothing behind it.

    SIMMER_PORT=8001 SIMMER_BARE_MESSAGES=6 python -m bench.bare

It serves WS /v1/stream on uvicorn, configured as the service is (`server_config`, the
same SIMMER_* settings), and answers each generate message as the service does: a
session event, `max_tokens` tokens in at most SIMMER_BARE_MESSAGES token messages
(all but the last of ceil(max_tokens / SIMMER_BARE_MESSAGES) tokens), then a done
event. There is no Litestar, no validation, no session store and no engine: its CPU
per token under a load is what the ASGI server and the wire protocol alone cost on
that load, a floor under the service's. GET /readyz answers 200, for `ServiceProcess`.

The bench gives it the service's token messages per generation on the same load,
rounded down, and every generation runs to `max_tokens`: no more messages, and no fewer
tokens to spread each connection's cost over, than the service had.
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Any

import msgspec
import uvicorn

from service.__main__ import quiet_server_logs, server_config
from service.settings import Settings

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
WORD = " word"  # each token's text: about as long as the trained model's words


def protocol_app(messages: int) -> Any:
    """The ASGI app: lifespan, GET /readyz, and WS /v1/stream."""
    sessions = itertools.count()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["type"] == "http":
            status = 200 if scope["path"] == "/readyz" else 404
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        else:
            await stream(receive, send)

    async def stream(receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        session_id = ""
        while (message := await receive())["type"] != "websocket.disconnect":
            request = _decode(message["text"])
            total = int(request.get("max_tokens", 16))
            per = max(1, -(-total // messages))  # ceil(total / messages)
            created = not session_id
            session_id = session_id or f"{next(sessions):032x}"
            await _send(send, {"type": "session", "session_id": session_id, "created": created})
            for index in range(0, total, per):
                count = min(per, total - index)
                token = {"type": "token", "text": WORD * count, "index": index, "count": count}
                await _send(send, token)
            usage = {
                "prompt_tokens": 2,
                "completion_tokens": total,
                "total_tokens": total + 2,
                "fed_tokens": 2,
                "session_tokens": total + 2,
            }
            done = {"type": "done", "finish_reason": "length", "usage": usage}
            await _send(send, {**done, "session_id": session_id})

    return app


async def _send(send: Any, obj: dict[str, Any]) -> None:
    await send({"type": "websocket.send", "bytes": None, "text": _encode(obj).decode()})


def main() -> int:
    try:
        messages = int(os.environ.get("SIMMER_BARE_MESSAGES", "1"))
        if messages < 1:
            raise ValueError(messages)
    except ValueError:
        print("error: SIMMER_BARE_MESSAGES must be a whole number >= 1", file=sys.stderr)
        return 2
    settings = Settings()
    config = server_config(protocol_app(messages), settings)
    quiet_server_logs(settings)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
