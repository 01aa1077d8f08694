"""The load runs of the benchmark: the load generator process against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.load import LoadSpec
from bench.procstat import tree_cpu_seconds
from harness.server import ServiceProcess

ROOT = Path(__file__).resolve().parents[1]


def run_load(server: ServiceProcess, spec: LoadSpec, timeout: float = 600) -> dict[str, Any]:
    """Run the load generator process against `server`; add the server's CPU per token.

    The server's CPU is read after every client has connected and before they start,
    and again once all have finished, so connection set-up is not counted; with
    `spec.reconnect` every request connects after the start, and its connection is.
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
        cpu_before = tree_cpu_seconds(server.proc.pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        cpu_after = tree_cpu_seconds(server.proc.pid)
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
