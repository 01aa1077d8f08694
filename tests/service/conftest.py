"""The real app in this process: `create_app(Settings(...), bundle)` behind Litestar's
test client, for the tests that need no server process of their own.

The app's lifespan (model, engine core, session store) runs inside
`async with AsyncTestClient(app=app)`. The client runs the app on a thread of its own
(a blocking portal), so each awaited request returns once the app has answered in full:
a streamed response arrives as a whole. Tests that need a real process (signals, kills,
a second replica, a client that leaves a live socket) use the servers of tests/conftest.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from litestar import Litestar
from litestar.testing import AsyncTestClient

from service.app import create_app
from service.settings import Settings
from simmer.bundle import ModelBundle, load_bundle

AppClient = AsyncTestClient[Litestar]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """asyncio only; session-scoped so that module-scoped apps may outlive one test."""
    return "asyncio"


@pytest.fixture(scope="session")
def model_bundle(tiny_bundle: Path) -> ModelBundle:
    """The tiny bundle, verified once and shared by every in-process app."""
    return load_bundle(tiny_bundle)


@asynccontextmanager
async def serving_app(bundle: ModelBundle, **settings: Any) -> AsyncIterator[AppClient]:
    """The app on `bundle` with these Settings fields, started and stopped around the block."""
    app = create_app(Settings(bundle=bundle.path, **settings), bundle)
    async with AsyncTestClient(app=app) as client:
        yield client


@pytest.fixture(scope="module")
async def memory_app(model_bundle: ModelBundle) -> AsyncIterator[AppClient]:
    """One in-process app with the memory store, shared by a test module."""
    async with serving_app(model_bundle) as client:
        yield client


@pytest.fixture(scope="module")
async def redis_app(model_bundle: ModelBundle, redis_url: str) -> AsyncIterator[AppClient]:
    """One in-process app with the Redis store on the test database, shared by a test
    module; its keys are deleted afterwards."""
    prefix = f"simmer-test-{uuid.uuid4().hex[:12]}"
    async with serving_app(
        model_bundle, store="redis", redis_url=redis_url, redis_prefix=prefix
    ) as client:
        yield client
    store = redis.Redis.from_url(redis_url)
    keys = list(store.scan_iter(f"{prefix}:*"))
    if keys:
        store.delete(*keys)
    store.close()


@pytest.fixture
async def start_app(
    model_bundle: ModelBundle,
) -> AsyncIterator[Callable[..., Awaitable[AppClient]]]:
    """Start in-process apps with other Settings fields; all stop after the test."""
    async with AsyncExitStack() as stack:

        async def start(**settings: Any) -> AppClient:
            return await stack.enter_async_context(serving_app(model_bundle, **settings))

        yield start


@pytest.fixture(params=["memory", "redis"])
def any_app(
    request: pytest.FixtureRequest, memory_app: AppClient, redis_app: AppClient
) -> AppClient:
    """The test runs once on the memory-store app and once on the Redis one."""
    return memory_app if request.param == "memory" else redis_app


async def generate(client: AppClient, **body: Any) -> dict[str, Any]:
    """POST /v1/generate, which must answer 200: its JSON."""
    response = await client.post("/v1/generate", json=body, timeout=30)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result
