"""A private redis-server on a free port, which a caller may kill and start again."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from harness.server import free_port


def redis_answers(url: str) -> bool:
    """Whether a Redis at `url` answers PING within a second."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        ok = bool(client.ping())
        client.close()
        return ok
    except redis.RedisError:
        return False


class RedisProcess:
    """redis-server on 127.0.0.1 and a free port, persisting nothing, at `url` (db `db`).

    `start()` returns once it answers and raises RuntimeError, in one line, when
    redis-server is not installed or does not start within 10 s. The port stays the
    same across `kill()` and `start()`, so clients see the same server come back."""

    def __init__(self, workdir: Path, db: int = 0) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/{db}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed (make test installs it)")
        self.proc = subprocess.Popen(
            [
                server,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not redis_answers(self.url):
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"private redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash would; a no-op when it is not running."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
