"""A real `python -m service` process for the benchmark, and the load runs against it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.load import LoadSpec
from bench.procstat import rss_bytes, tree_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`python -m service` on a free port, its output kept in `log_path` for failure
    messages; `settings` are SIMMER_* values without the prefix; `module` is what
    `python -m` runs (the tests' fault-injecting service, say). The benchmark, the soak
    and the test suite all start their servers with it."""

    def __init__(
        self, bundle: Path, log_path: Path, module: str = "service", **settings: str
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/stream"
        self.log_path = log_path
        env = {
            **os.environ,
            "SIMMER_BUNDLE": str(bundle),
            "SIMMER_HOST": "127.0.0.1",
            "SIMMER_PORT": str(self.port),
            **{f"SIMMER_{key.upper()}": value for key, value in settings.items()},
        }
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> Server:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_load(server: Server, spec: LoadSpec, timeout: float = 600) -> dict[str, Any]:
    """Run the load generator process against `server`; add the server's CPU per token.

    The server's CPU is read after every client has connected and before they start,
    and again once all have finished, so connection set-up is not counted.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.load", json.dumps(spec.__dict__)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError(f"load generator failed to connect: {line!r}\n{server.log()}")
        cpu_before = server.cpu_seconds()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        cpu_after = server.cpu_seconds()
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if not line:
        raise RuntimeError(f"load generator died (exit {proc.returncode})\n{server.log()}")
    result: dict[str, Any] = json.loads(line)
    cpu = cpu_after - cpu_before
    result["server_cpu_s"] = cpu
    result["server_cpu_per_token_s"] = cpu / result["tokens"] if result["tokens"] else None
    result["server_cpu_utilisation"] = cpu / result["wall_s"] if result["wall_s"] else None
    return result
