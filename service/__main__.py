"""Serve a model bundle.

    SIMMER_BUNDLE=models/default SIMMER_PORT=8000 python -m service

Every setting is a SIMMER_* environment variable (see service/settings.py). A bundle
that fails verification stops the start with a one-line reason.
"""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError


def main() -> int:
    from service.settings import Settings
    from simmer.bundle import BundleError, load_bundle

    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"error: SIMMER_{str(first['loc'][0]).upper()}: {first['msg']}", file=sys.stderr)
        return 2
    try:
        bundle = load_bundle(settings.bundle)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from service.app import create_app

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings, bundle)
    base = f"http://{settings.host}:{settings.port}"
    print(
        f"simmer: serving {bundle.name} {bundle.version}\n"
        f"  playground  {base}/\n  API docs    {base}/schema\n  metrics     {base}/metrics",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=30,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
