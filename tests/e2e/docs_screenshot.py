"""Retake docs/playground.png: the playground after a real generation.

    python -m tests.e2e.docs_screenshot --url http://127.0.0.1:8000/ --out docs/playground.png

Point it at a running server (`make run`, or `SIMMER_BUNDLE=BUNDLE python -m service`);
the README's picture was taken with the `tiny` preset.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from .browser import launch_chromium


def take_screenshot(url: str, out: Path, prompt: str, seed: int, max_tokens: int) -> int:
    """Generate with a fixed seed, pick a word to show its distribution, save; bytes written."""
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 820}, color_scheme="light")
            page.goto(url)
            expect(page.get_by_test_id("model")).to_have_attribute("data-tone", "ok")
            page.get_by_test_id("prompt").fill(prompt)
            page.get_by_test_id("max-tokens").fill(str(max_tokens))
            page.get_by_test_id("seed").fill(str(seed))
            page.get_by_test_id("generate").click()
            expect(page.get_by_test_id("finish-reason")).not_to_have_text("—", timeout=30_000)
            words = page.get_by_test_id("token").filter(has_text=re.compile(r"^[a-z]{4,}$"))
            words.nth(words.count() * 2 // 3).click()
            page.mouse.move(0, 0)  # no hover highlight in the picture
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=out, full_page=True)
        finally:
            browser.close()
    return out.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/")
    parser.add_argument("--out", type=Path, default=Path("docs/playground.png"))
    parser.add_argument("--prompt", default="recipe for roasted vegetables |")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=70)
    args = parser.parse_args()
    size = take_screenshot(args.url, args.out, args.prompt, args.seed, args.max_tokens)
    print(f"{args.out}: {size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
