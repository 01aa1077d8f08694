"""harness.server: a real `python -m service` on a free port, and what it says when it fails."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from harness.server import ServiceProcess, free_port


def test_free_port_can_be_listened_on() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert sock.getsockname() == ("127.0.0.1", port)


def test_a_process_that_exits_early_raises_with_its_exit_status_and_log(tmp_path: Path) -> None:
    server = ServiceProcess(tmp_path, tmp_path / "server.log", module="harness.no_such_module")
    with pytest.raises(RuntimeError) as caught:
        server.wait_ready(timeout=60)
    server.stop()
    message = str(caught.value)
    assert message.startswith("server exited with 1:")
    assert "No module named harness.no_such_module" in message


def test_entering_a_process_that_cannot_start_stops_it_and_raises(tmp_path: Path) -> None:
    server = ServiceProcess(tmp_path / "no-bundle", tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="server exited with"), server:
        pass
    assert server.proc.returncode is not None


def test_settings_reach_the_service_as_simmer_variables(tiny_bundle: Path, tmp_path: Path) -> None:
    with ServiceProcess(tiny_bundle, tmp_path / "server.log", max_new_tokens="77") as server:
        assert server.base_url == f"http://127.0.0.1:{server.port}"
        entry = httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["data"][0]
        assert entry["limits"]["max_new_tokens"] == 77
    assert server.proc.poll() is not None  # leaving the block stopped it
