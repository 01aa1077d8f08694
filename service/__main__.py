"""Serve a model bundle.

    SIMMER_BUNDLE=models/default SIMMER_PORT=8000 python -m service

Every setting is a SIMMER_* environment variable (see service/settings.py). A bundle
that fails verification stops the start with a one-line reason. SIGTERM drains: new
generations are refused, running ones get SIMMER_SHUTDOWN_GRACE_S to finish, the rest
end with finish_reason "shutdown" after saving their sessions; then the server exits.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError

from service.settings import Settings
from service.state import ServiceState

logger = logging.getLogger("simmer")


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain between the first signal and the shutdown.

    A second signal exits at once.
    """

    def __init__(self, config: uvicorn.Config, runtime: ServiceState, grace_s: float) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.grace_s = grace_s
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop = self.loop
        if self.draining or loop is None:
            super().handle_exit(sig, frame)
            return
        self.draining = True
        loop.call_soon_threadsafe(lambda: loop.create_task(self.drain()))

    async def drain(self) -> None:
        if self.runtime.generation is not None:
            ended = await self.runtime.generation.drain(self.grace_s)
            logger.info("drained: %d generation(s) ended by the shutdown", ended)
        self.should_exit = True


class WebSocketAccessLog(logging.Filter):
    """Drops the lines uvicorn's error logger writes for every WebSocket: its "[accepted]"
    line, and the websockets library's "connection open" and "connection closed". They
    are the connection's access log, written at info whether or not the access log is
    on; a line per client costs a formatted record and a write. SIMMER_ACCESS_LOG brings
    them back, with the HTTP access log."""

    PER_CONNECTION = frozenset({"connection open", "connection closed"})

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        if not isinstance(message, str):
            return True
        return message not in self.PER_CONNECTION and not message.endswith(
            '"WebSocket %s" [accepted]'
        )


def server_config(app: Any, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration for serving `app` (the service, or the bench's bare
    protocol server, which must be served alike)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        ws_per_message_deflate=False,
        ws_max_size=settings.max_ws_message_bytes * 4,
        timeout_graceful_shutdown=5,
    )


def quiet_server_logs(settings: Settings) -> None:
    """The ASGI server's loggers: no API key in any line, and no line per connection
    unless the access log is on."""
    from service.security import redact_server_logs

    if not settings.access_log:
        # uvicorn logs each accepted WebSocket on its error logger, access log or not;
        # added before RedactKeys, which rewrites the message this filter matches
        logging.getLogger("uvicorn.error").addFilter(WebSocketAccessLog())
    redact_server_logs("uvicorn", "uvicorn.error", "uvicorn.access")


def main() -> int:
    from simmer.bundle import BundleError, load_bundle

    try:
        settings = Settings()
        keys = settings.all_api_keys()
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"error: SIMMER_{str(first['loc'][0]).upper()}: {first['msg']}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: SIMMER_API_KEYS_FILE: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return 2
    try:
        bundle = load_bundle(settings.bundle)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from prometheus_client import disable_created_metrics

    from service.app import create_app
    from service.routes.ws import with_stream

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series: noise here
    app = create_app(settings, bundle)
    base = f"http://{settings.host}:{settings.port}"
    print(
        f"simmer: serving {bundle.name} {bundle.version}"
        f"{' (API keys required)' if keys else ''}\n"
        f"  playground  {base}/\n  API docs    {base}/schema\n  metrics     {base}/metrics",
        file=sys.stderr,
        flush=True,
    )
    config = server_config(with_stream(app), settings)
    quiet_server_logs(settings)
    DrainingServer(config, app.state.runtime, settings.shutdown_grace_s).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
