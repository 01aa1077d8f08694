"""Shared fixtures: a tiny trained bundle, a real Redis (one node, or a Redis Cluster), and
a real server process."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.redis import RedisCluster, RedisProcess, redis_answers
from harness.server import ServiceProcess, free_port

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


def start_redis(workdir: Path, db: int = 0) -> RedisProcess:
    """A started private redis-server; a test fails, with the reason, if it cannot start."""
    redis_proc = RedisProcess(workdir, db)
    try:
        redis_proc.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    return redis_proc


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SIMMER_TEST_REDIS_URL (default db 15 on 127.0.0.1:6379), or a private redis-server."""
    url = os.environ.get("SIMMER_TEST_REDIS_URL", DEFAULT_TEST_REDIS)
    if redis_answers(url):
        yield url
        return
    private = start_redis(tmp_path_factory.mktemp("redis"), db=15)
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


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private redis-server of the test's own, which it may kill and start again."""
    redis_proc = start_redis(tmp_path)
    yield redis_proc
    redis_proc.kill()


def start_redis_cluster(workdir: Path) -> RedisCluster:
    """A started private Redis Cluster (three masters, one replica each); a test fails,
    with the reason, if it cannot start."""
    cluster = RedisCluster(workdir)
    try:
        cluster.start()
    except RuntimeError as exc:
        cluster.stop()
        pytest.fail(str(exc))
    return cluster


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A real Redis Cluster on loopback ports, shared by the test session; a test that
    kills nodes starts its own (`private_redis_cluster`)."""
    cluster = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def clean_redis_cluster(redis_cluster: RedisCluster) -> Iterator[str]:
    """The shared cluster's seed URL, every master emptied before and after the test."""
    redis_cluster.flush()
    yield redis_cluster.url
    redis_cluster.flush()


@pytest.fixture
def private_redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A Redis Cluster of the test's own, whose masters it may kill."""
    cluster = start_redis_cluster(tmp_path)
    yield cluster
    cluster.stop()


# The name the tests know harness.server.ServiceProcess by.
ServerProcess = ServiceProcess


def launch_server(
    bundle: Path, log_dir: Path, wait: bool = True, module: str = "service", **settings: str
) -> ServerProcess:
    """A real `python -m service` (or `module`) with SIMMER_<KEY>=value for each keyword."""
    server = ServiceProcess(bundle, log_dir / f"server-{free_port()}.log", module, **settings)
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
