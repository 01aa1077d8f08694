"""Shared fixtures: a tiny trained bundle, a real Redis, and a real server process."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.server import Server
from bench.server import free_port as free_port  # the tests import it from here

ROOT = Path(__file__).resolve().parents[1]
EPICURIOUS = Path(
    os.environ.get(
        "SIMMER_EPICURIOUS",
        ROOT.parent / "shared" / "data" / "epicurious" / "full_format_recipes.json",
    )
)
DEFAULT_TEST_REDIS = "redis://127.0.0.1:6379/15"


@pytest.fixture(scope="session")
def epicurious_path() -> Path:
    if not EPICURIOUS.is_file():
        pytest.fail(f"the book's dataset is missing: {EPICURIOUS}")
    return EPICURIOUS


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, epicurious_path: Path) -> Path:
    """A `tiny` preset trained on 300 Epicurious recipes: checkpoint, tokenizer, metrics."""
    from training.data import load_corpus
    from training.presets import get_preset
    from training.train import train

    out = tmp_path_factory.mktemp("tiny-run")
    config = get_preset("tiny").with_overrides(max_recipes=300)
    train(load_corpus(epicurious_path, config.max_recipes), config, out)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path) -> Path:
    """The tiny run exported to a verified bundle."""
    from export.bundle_writer import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    work = tmp_path_factory.mktemp("export-work")
    build_bundle(tiny_run / "best.pt", out, work)
    return out


def _redis_answers(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        ok = bool(client.ping())
        client.close()
        return ok
    except redis.RedisError:
        return False


class RedisProcess:
    """A private redis-server on a free port, which a test may kill and start again."""

    def __init__(self, workdir: Path, db: int = 0) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/{db}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            pytest.fail("redis-server is not installed (make test installs it)")
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
        while not _redis_answers(self.url):
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail("private redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SIMMER_TEST_REDIS_URL (default db 15 on 127.0.0.1:6379), or a private redis-server."""
    url = os.environ.get("SIMMER_TEST_REDIS_URL", DEFAULT_TEST_REDIS)
    if _redis_answers(url):
        yield url
        return
    private = RedisProcess(tmp_path_factory.mktemp("redis"), db=15)
    private.start()
    yield private.url
    private.kill()


@pytest.fixture
def clean_redis(redis_url: str) -> Iterator[str]:
    """The test Redis database, emptied before and after the test."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield redis_url
    client.flushdb()
    client.close()


# One class starts real servers for the benchmark, the soak and these tests.
ServerProcess = Server


def launch_server(
    bundle: Path, log_dir: Path, wait: bool = True, module: str = "service", **settings: str
) -> ServerProcess:
    """A real `python -m service` (or `module`) with SIMMER_<KEY>=value for each keyword."""
    server = Server(bundle, log_dir / f"server-{free_port()}.log", module, **settings)
    if wait:
        try:
            server.wait_ready()
        except BaseException:
            server.stop()
            raise
    return server


@pytest.fixture
def start_server(tmp_path: Path, tiny_bundle: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start real servers with extra SIMMER_* settings; all are stopped after the test."""
    servers: list[ServerProcess] = []

    def start(wait: bool = True, module: str = "service", **settings: str) -> ServerProcess:
        server = launch_server(tiny_bundle, tmp_path, wait, module, **settings)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def memory_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path
) -> Iterator[ServerProcess]:
    """One server with the memory store, shared by a test module."""
    server = launch_server(tiny_bundle, tmp_path_factory.mktemp("memory-server"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, redis_url: str
) -> Iterator[ServerProcess]:
    """One server with the Redis store on the test database, shared by a test module."""
    import redis

    prefix = f"simmer-test-{free_port()}"
    server = launch_server(
        tiny_bundle,
        tmp_path_factory.mktemp("redis-server"),
        store="redis",
        redis_url=redis_url,
        redis_prefix=prefix,
    )
    yield server
    server.stop()
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """One real server with the memory store."""
    return start_server()
