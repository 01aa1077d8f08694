"""The playground page (GET /), driven in Debian's Chromium against a real server.

The tests share one `python -m service` on the tiny bundle (`playground_server`,
which allows 100 000-token generations); the error test starts its own with a low
limit. They use the page as a person would: typing, clicking and pressing keys. What the server sent
is read from the page's own WebSocket frames, so the page is checked against the API.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from playwright.sync_api import Page, WebSocket, expect

from tests.conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "e2e"

Message = dict[str, Any]


class StreamLog:
    """Every WebSocket the page opens and every JSON frame sent or received on it."""

    def __init__(self, page: Page) -> None:
        self.urls: list[str] = []
        self.sent: list[Message] = []
        self.received: list[Message] = []
        page.on("websocket", self._watch)

    def _watch(self, socket: WebSocket) -> None:
        self.urls.append(socket.url)
        socket.on("framesent", lambda payload: self.sent.append(json.loads(payload)))
        socket.on("framereceived", lambda payload: self.received.append(json.loads(payload)))

    def of_type(self, kind: str) -> list[Message]:
        return [m for m in self.received if m["type"] == kind]

    def steps(self) -> list[Message]:
        """One logprobs entry per generated token, in order, across all token events."""
        return [entry for event in self.of_type("token") for entry in event["logprobs"]]


def wait_until(page: Page, condition: Callable[[], bool], what: str) -> None:
    """Let the page's events arrive until `condition` holds (at most ~15 s)."""
    for _ in range(300):
        if condition():
            return
        page.wait_for_timeout(50)
    pytest.fail(f"timed out waiting for {what}")


def open_playground(page: Page, server: ServerProcess, to_length: bool = True) -> StreamLog:
    """Load the page. `to_length` ticks "write all max tokens": the tiny model may end a
    recipe after any word, so a run whose length a test checks must not stop early."""
    log = StreamLog(page)
    page.goto(f"{server.base_url}/")
    expect(page.get_by_test_id("model")).to_have_attribute("data-tone", "ok")
    if to_length:
        page.get_by_test_id("ignore-eos").check()
    return log


def set_controls(page: Page, **values: str) -> None:
    for name, value in values.items():
        page.get_by_test_id(name.replace("_", "-")).fill(value)


def generate_and_wait(page: Page, button: str = "generate", reason: str = "length") -> None:
    page.get_by_test_id(button).click()
    expect(page.get_by_test_id("finish-reason")).to_have_text(reason)


def shown(word: str) -> str:
    """How the page labels a vocabulary word ("" is the end-of-text token)."""
    return "⏎ end" if word == "" else word


def matches_percent(text: str, prob: float) -> bool:
    """Whether a shown percentage such as "12.4%" or "<0.1%" is `prob`, rounded."""
    if text.startswith("<"):
        return prob * 100 < float(text.strip("<%"))
    value = text.rstrip("%")
    decimals = len(value.partition(".")[2])
    return abs(float(value) - prob * 100) <= 0.5 * 10.0**-decimals + 1e-9


def expect_distribution(page: Page, step: Message, index: int) -> None:
    """The probability panel shows step `index`: its top words, their shares, the draw."""
    expect(page.get_by_test_id("prob-bars")).to_have_attribute("data-step", str(index))
    top = step["top"]
    words = [shown(w["token"]) for w in top]
    if step["id"] not in {w["id"] for w in top}:
        words.append(shown(step["token"]))  # the drawn word, listed under the top five
    expect(page.get_by_test_id("prob-word")).to_have_text(words)
    percents = page.get_by_test_id("prob-pct").all_inner_texts()
    probs = [w["prob"] for w in top]
    assert all(matches_percent(t, p) for t, p in zip(percents, probs, strict=False)), percents
    expect(page.locator("[data-testid=prob-row].chosen")).to_have_attribute(
        "data-token", step["token"]
    )
    expect(page.get_by_test_id("probs-context")).to_contain_text(f"Word {index + 1}:")


OBSERVE_OUTPUT_LENGTH = """() => {
    const output = document.querySelector("[data-testid=output]");
    window.outputLengths = [];
    new MutationObserver(() => window.outputLengths.push(output.textContent.length))
        .observe(output, {childList: true, characterData: true, subtree: true});
}"""


def test_generate_streams_word_by_word_and_continue_extends_the_same_session(
    page: Page, playground_server: ServerProcess
) -> None:
    log = open_playground(page, playground_server)
    prompt = page.get_by_test_id("prompt")
    expect(prompt).to_have_value("recipe for")
    prompt.fill("recipe for roasted vegetables")
    set_controls(page, max_tokens="60", seed="11")
    page.evaluate(OBSERVE_OUTPUT_LENGTH)
    generate_and_wait(page)

    # The output grew once per token event as the events arrived, never all at once.
    # (How many events carry the 60 tokens depends on how fast the page reads them: a
    # stream that falls behind gets several tokens per event, so only the growth per
    # event is asserted, not a count of events.)
    tokens = log.of_type("token")
    lengths: list[int] = page.evaluate("window.outputLengths")
    text = page.get_by_test_id("output").text_content() or ""
    assert tokens and sum(t["count"] for t in tokens) == 60
    assert lengths == sorted(lengths)
    assert len(set(lengths)) == len(tokens) + 1  # the prompt, then each token event
    assert lengths[-1] == len(text)
    assert text == "recipe for roasted vegetables" + "".join(t["text"] for t in tokens)
    expect(page.get_by_test_id("token-count")).to_have_text("60")
    expect(page.get_by_test_id("tokens-per-second")).to_contain_text("tok/s")
    expect(page.get_by_test_id("ttft")).to_contain_text("ms")

    # The bars show the latest step's top five, the drawn word marked.
    steps = log.steps()
    assert len(steps) == 60
    expect_distribution(page, steps[-1], 59)

    session_id = log.of_type("session")[0]["session_id"]
    expect(page.get_by_test_id("session-id")).to_have_text(session_id)

    generate_and_wait(page, "continue")
    wait_until(page, lambda: len(log.of_type("done")) == 2, "the second done event")
    longer = page.get_by_test_id("output").text_content() or ""
    assert longer.startswith(text)
    assert len(longer) > len(text)
    expect(page.get_by_test_id("session-id")).to_have_text(session_id)
    assert log.of_type("done")[1]["session_id"] == session_id
    resend = [m for m in log.sent if m["type"] == "generate"][-1]
    assert resend["prompt"] == ""  # the history stays on the server
    assert resend["seed"] == 12  # the next seed: the same one again would replay its draws
    assert resend["ignore_eos"] is True  # "write all max tokens" is ticked
    assert len(log.urls) == 1  # on the same connection

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "playground.png"
    page.screenshot(path=shot, full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG")


def test_clicking_an_earlier_word_shows_the_distribution_it_was_drawn_from(
    page: Page, playground_server: ServerProcess
) -> None:
    log = open_playground(page, playground_server)
    set_controls(page, max_tokens="30", seed="5")
    generate_and_wait(page)
    steps = log.steps()
    assert len(steps) == 30

    word = page.get_by_test_id("token").nth(3)
    word.click()
    expect_distribution(page, steps[3], 3)
    expect(word).to_have_attribute("aria-current", "true")

    page.get_by_test_id("output").press("ArrowLeft")
    expect_distribution(page, steps[2], 2)

    page.get_by_test_id("follow-latest").click()
    expect_distribution(page, steps[29], 29)
    expect(page.get_by_test_id("follow-latest")).to_be_hidden()


def test_stop_cancels_a_long_generation(page: Page, playground_server: ServerProcess) -> None:
    log = open_playground(page, playground_server)
    set_controls(page, temperature="0", max_tokens="100000")
    stop = page.get_by_test_id("stop").bounding_box()
    assert stop is not None
    page.get_by_test_id("generate").click()
    # Press Stop as soon as words arrive. The words stream faster than a busy page draws
    # them, and Playwright's element checks queue behind that backlog while plain input
    # does not: so watch the frames and press the button's spot with the mouse.
    wait_until(page, lambda: bool(log.of_type("token")), "the first words")
    page.mouse.click(stop["x"] + stop["width"] / 2, stop["y"] + stop["height"] / 2)
    # The server stops within a step, but on a busy machine the page may still have a
    # backlog of words to draw before the done event: allow for it.
    expect(page.get_by_test_id("finish-reason")).to_have_text("cancelled", timeout=60_000)
    expect(page.get_by_test_id("run-state")).to_contain_text("Stopped")
    wait_until(page, lambda: bool(log.of_type("done")), "the done event")
    done = log.of_type("done")[0]
    assert {"type": "cancel"} in log.sent
    assert done["finish_reason"] == "cancelled"
    assert 0 < done["usage"]["completion_tokens"] < 100_000
    words = done["usage"]["completion_tokens"]
    expect(page.get_by_test_id("token-count")).to_have_text(str(words))
    expect(page.get_by_test_id("token")).to_have_count(words)  # all the session holds
    expect(page.get_by_test_id("stop")).to_be_disabled()
    expect(page.get_by_test_id("continue")).to_be_enabled()


def test_an_api_error_is_shown_readably_next_to_its_field(
    page: Page, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(max_new_tokens="50")
    log = open_playground(page, server)
    set_controls(page, max_tokens="100")
    page.get_by_test_id("generate").click()

    error = page.get_by_test_id("error")
    expect(error).to_be_visible()
    wait_until(page, lambda: bool(log.of_type("error")), "the error event")
    expect(error).to_contain_text("Invalid request")
    expect(error).to_contain_text(log.of_type("error")[0]["message"])
    expect(error).to_contain_text("max_tokens must be between 1 and 50")
    expect(error).to_contain_text("Field: max tokens")
    expect(page.get_by_test_id("max-tokens")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_test_id("run-state")).to_contain_text("Failed")
    expect(page.get_by_test_id("token")).to_have_count(0)

    # The page is not stuck: within the limit it generates, and the error goes away.
    set_controls(page, max_tokens="20")
    generate_and_wait(page)
    expect(error).to_be_hidden()
    expect(page.get_by_test_id("max-tokens")).not_to_have_attribute("aria-invalid", "true")
    expect(page.get_by_test_id("token")).to_have_count(20)


def test_new_session_starts_over_and_frees_the_old_one(
    page: Page, playground_server: ServerProcess
) -> None:
    log = open_playground(page, playground_server)
    set_controls(page, max_tokens="10")
    generate_and_wait(page)
    old = log.of_type("session")[0]["session_id"]
    assert httpx.get(f"{playground_server.base_url}/v1/sessions/{old}").status_code == 200

    page.get_by_test_id("new-session").click()
    expect(page.get_by_test_id("run-state")).to_have_text("New session: ready")
    expect(page.get_by_test_id("session-id")).to_have_text("—")
    expect(page.get_by_test_id("token")).to_have_count(0)
    expect(page.get_by_test_id("continue")).to_be_disabled()
    assert httpx.get(f"{playground_server.base_url}/v1/sessions/{old}").status_code == 404

    page.get_by_test_id("ignore-eos").uncheck()  # now the model may end the recipe early
    page.get_by_test_id("generate").click()
    expect(page.get_by_test_id("finish-reason")).to_have_text(re.compile("^(length|eos)$"))
    new = log.of_type("session")[-1]["session_id"]
    assert new != old
    expect(page.get_by_test_id("session-id")).to_have_text(new)
    assert "ignore_eos" not in [m for m in log.sent if m["type"] == "generate"][-1]


def test_with_api_keys_configured_the_key_field_unlocks_the_page_and_is_remembered(
    page: Page, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(api_keys="sk-playground-1")
    log = StreamLog(page)
    page.goto(f"{server.base_url}/")
    error = page.get_by_test_id("error")
    expect(page.get_by_test_id("model")).to_have_attribute("data-tone", "error")
    expect(error).to_contain_text("Unauthorized")
    expect(error).to_contain_text("Enter a key under Connection")

    # without a key the stream is refused, and the page shows the server's reason
    set_controls(page, max_tokens="5")
    page.get_by_test_id("generate").click()
    expect(error).to_contain_text("Unauthorized")
    expect(error).to_contain_text("a valid API key is required")
    expect(error).to_contain_text("Enter a key under Connection")
    expect(page.get_by_test_id("run-state")).to_contain_text("Failed")

    key = page.get_by_test_id("api-key")
    key.fill("sk-playground-1")
    with page.expect_request(lambda r: r.url.endswith("/v1/models")) as models:
        key.press("Enter")
    assert models.value.all_headers()["authorization"] == "Bearer sk-playground-1"
    expect(page.get_by_test_id("model")).to_have_attribute("data-tone", "ok")
    expect(error).to_be_hidden()

    page.reload()  # kept in localStorage
    expect(key).to_have_value("sk-playground-1")
    page.get_by_test_id("ignore-eos").check()
    set_controls(page, max_tokens="5")
    generate_and_wait(page)
    assert parse_qs(urlparse(log.urls[-1]).query)["api_key"] == ["sk-playground-1"]
    expect(page.get_by_test_id("token")).to_have_count(5)

    page.get_by_role("button", name="Forget").click()
    page.reload()
    expect(key).to_have_value("")
    expect(error).to_contain_text("Unauthorized")


UNLABELLED_CONTROLS = """() => [...document.querySelectorAll("input, textarea, select, button")]
    .filter((el) => {
        const byLabel = [...(el.labels ?? [])].map((l) => l.textContent).join("");
        const byRef = (el.getAttribute("aria-labelledby") ?? "").split(" ")
            .map((id) => document.getElementById(id)?.textContent ?? "").join("");
        const text = el.tagName === "BUTTON" ? el.textContent : "";
        const own = el.getAttribute("aria-label") ?? text;
        return !(byLabel + byRef + own).trim();
    })
    .map((el) => el.id || el.outerHTML.slice(0, 80))"""

# WCAG 2 contrast of every visible text node and form value against what is behind it.
LOW_CONTRAST_TEXT = (Path(__file__).parent / "low_contrast_text.js").read_text()


def test_page_is_self_contained_labelled_keyboard_usable_and_readable(
    page: Page, playground_server: ServerProcess
) -> None:
    hosts: set[str] = set()
    page.on(
        "request", lambda r: hosts.add(urlparse(r.url).netloc) if r.url[:5] != "data:" else None
    )
    log = open_playground(page, playground_server)

    # keyboard only: Ctrl+Enter in the prompt generates, arrow keys walk the words
    page.get_by_test_id("prompt").press("Control+Enter")
    expect(page.get_by_test_id("finish-reason")).to_have_text("length")
    page.get_by_test_id("output").press("Home")
    expect(page.get_by_test_id("prob-bars")).to_have_attribute("data-step", "0")
    set_controls(page, top_p="0")  # the API rejects it: an error panel to check too
    page.get_by_test_id("prompt").press("Control+Enter")
    expect(page.get_by_test_id("error")).to_contain_text("top_p")

    assert hosts == {urlparse(playground_server.base_url).netloc}
    assert all(
        urlparse(url).netloc == urlparse(playground_server.base_url).netloc for url in log.urls
    )
    assert page.evaluate(UNLABELLED_CONTROLS) == []
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        assert page.evaluate(LOW_CONTRAST_TEXT) == [], scheme
