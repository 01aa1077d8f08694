"""Fixtures for the playground's end-to-end tests: a server and Chromium per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import ServerProcess, launch_server

from .browser import launch_chromium

TIMEOUT_MS = 15_000
LONG_GENERATIONS = "100000"  # max_new_tokens: a generation long enough to be stopped by hand


@pytest.fixture(scope="module")
def playground_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path
) -> Iterator[ServerProcess]:
    """One real server on the tiny bundle, shared by the module, that allows long runs."""
    server = launch_server(
        tiny_bundle, tmp_path_factory.mktemp("playground-server"), max_new_tokens=LONG_GENERATIONS
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        try:
            browser = launch_chromium(playwright)
        except FileNotFoundError as exc:
            pytest.fail(str(exc))
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (own localStorage); fails the test on uncaught page errors."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    if errors:
        pytest.fail(f"uncaught errors in the page: {errors}")
