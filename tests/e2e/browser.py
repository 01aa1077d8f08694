"""Debian's Chromium, driven by Playwright: the one place its path and flags live.

Playwright cannot download its own browser here, so it launches /usr/bin/chromium
(`make system-deps` installs it) with flags that work as root in a container.
"""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Browser, Playwright

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def launch_chromium(playwright: Playwright) -> Browser:
    if not CHROMIUM.is_file():
        raise FileNotFoundError(f"{CHROMIUM} is missing; `make system-deps` installs it")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
