"""The playground page (GET /), driven in Debian's Chromium against a real server.

The tests share one `python -m service` on the tiny bundle (`playground_server`,
which allows 100 000-token generations); the error test starts its own with a low
limit. They use the page as a person would: typing, clicking and pressing keys. What the server sent
is read from the page's own WebSocket frames and HTTP calls, and what the session
holds afterwards from the session routes, so the page is checked against the API.
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
from playwright.sync_api import Page, Request, WebSocket, expect

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


def session_info(server: ServerProcess, session_id: str) -> Message:
    """GET /v1/sessions/{id}: what the server holds for the session."""
    response = httpx.get(f"{server.base_url}/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    info: Message = response.json()
    return info


def next_words(server: ServerProcess, session_id: str, temperature: float) -> Message:
    """GET /v1/sessions/{id}/next as the page asks for it: the top five."""
    response = httpx.get(
        f"{server.base_url}/v1/sessions/{session_id}/next",
        params={"top": 5, "temperature": temperature},
    )
    assert response.status_code == 200, response.text
    peek: Message = response.json()
    return peek


def expect_next_word(page: Page, peek: Message, greedy: bool = False) -> None:
    """The probability panel shows the idle session's next word: `peek`'s words and shares,
    labelled as the next word, none of them drawn."""
    bars = page.get_by_test_id("prob-bars")
    expect(bars).to_have_attribute("data-step", "next")
    note = page.get_by_test_id("probs-note")
    # the note names the temperature: a panel still showing an older peek has another
    expect(note).to_contain_text("greedy" if greedy else f"temperature {peek['temperature']:g},")
    expect(page.get_by_test_id("probs-context")).to_contain_text("Next word, not drawn yet")
    expect(page.get_by_test_id("prob-word")).to_have_text([shown(w["token"]) for w in peek["top"]])
    percents = page.get_by_test_id("prob-pct").all_inner_texts()
    probs = [w["prob"] for w in peek["top"]]
    assert all(matches_percent(t, p) for t, p in zip(percents, probs, strict=True)), percents
    expect(bars.locator(".chosen")).to_have_count(0)


def posted(request: Request) -> Message:
    """The JSON body of a request the page made."""
    body = request.post_data_json
    assert isinstance(body, dict), body
    return body


def texts_by_call(page: Page, log: StreamLog, calls: int) -> list[str]:
    """The text each call on the page's WebSockets generated, in order, once `calls` are done."""
    wait_until(page, lambda: len(log.of_type("done")) >= calls, f"{calls} done events")
    texts, text = [], ""
    for message in log.received:
        if message["type"] == "token":
            text += message["text"]
        elif message["type"] == "done":
            texts.append(text)
            text = ""
    return texts


# Each time `target` (a selector) changes, what the endings say and which buttons are off.
RECORD_BUTTONS = """(target) => {
    const ids = ["generate", "continue", "undo", "another-ending", "stop"];
    const button = (id) => document.querySelector(`[data-testid=${id}]`);
    const records = [];
    window.buttonRecords = records;
    const watch = {childList: true, characterData: true, subtree: true};
    new MutationObserver(() => records.push({
        endings: document.querySelector("[data-testid=endings-state]").textContent,
        disabled: Object.fromEntries(ids.map((id) => [id, button(id).disabled])),
    })).observe(document.querySelector(target), watch);
}"""

BUSY = {"generate": True, "continue": True, "undo": True, "another-ending": True, "stop": False}


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

    # The last word (End) shows the last step's top five, the drawn word marked.
    steps = log.steps()
    assert len(steps) == 60
    page.get_by_test_id("output").press("End")
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

    # with the run over, "Next word" goes back to the word that would come next
    follow = page.get_by_test_id("follow-latest")
    expect(follow).to_have_text("Next word")
    follow.click()
    session_id = log.of_type("session")[0]["session_id"]
    expect_next_word(page, next_words(playground_server, session_id, 1.0))
    expect(follow).to_be_hidden()


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
    with page.expect_request(lambda r: "/next?" in r.url) as peek:
        generate_and_wait(page)
    assert parse_qs(urlparse(log.urls[-1]).query)["api_key"] == ["sk-playground-1"]
    assert peek.value.all_headers()["authorization"] == "Bearer sk-playground-1"
    expect(page.get_by_test_id("prob-bars")).to_have_attribute("data-step", "next")
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


def test_undo_takes_the_last_call_back_out_of_the_session_and_the_page(
    page: Page, playground_server: ServerProcess
) -> None:
    log = open_playground(page, playground_server)
    set_controls(page, temperature="0", max_tokens="8")  # greedy: a call can be written again
    undo = page.get_by_test_id("undo")
    output = page.get_by_test_id("output")
    count = page.get_by_test_id("token-count")
    expect(undo).to_be_disabled()  # no session yet
    generate_and_wait(page)
    session_id = log.of_type("session")[0]["session_id"]
    first_text = output.text_content() or ""
    first = session_info(playground_server, session_id)
    assert first["rewind_points"] == 1
    expect(undo).to_be_enabled()

    generate_and_wait(page, "continue")
    expect(count).to_have_text("16")  # the words of both calls
    second_text = output.text_content() or ""
    second = session_info(playground_server, session_id)
    assert second_text.startswith(first_text) and len(second_text) > len(first_text)
    assert second["tokens"] > first["tokens"]

    with page.expect_response(lambda r: r.url.endswith(f"/{session_id}/rewind")) as rewind:
        undo.click()
    assert rewind.value.status == 200
    assert rewind.value.request.post_data_json == {"turns": 1}
    expect(page.get_by_test_id("run-state")).to_have_text("Undone: back to 8 words")
    expect(page.get_by_test_id("token")).to_have_count(8)
    expect(output).to_have_text(first_text)
    expect(count).to_have_text("8")
    after = session_info(playground_server, session_id)
    assert (after["tokens"], after["rewind_points"]) == (first["tokens"], first["rewind_points"])
    assert rewind.value.json()["tokens"] == first["tokens"]

    # greedy, from the same state: Continue writes the undone words again
    generate_and_wait(page, "continue")
    expect(output).to_have_text(second_text)
    texts = texts_by_call(page, log, 3)
    assert texts[2] == texts[1]
    assert session_info(playground_server, session_id)["tokens"] == second["tokens"]

    # back past the first call: the prompt goes too, and nothing is left to undo
    undo.click()
    expect(count).to_have_text("8")
    undo.click()
    expect(count).to_have_text("0")
    expect(page.get_by_test_id("token")).to_have_count(0)
    expect(page.get_by_test_id("prompt-echo")).to_have_count(0)
    for control in ("undo", "continue", "another-ending"):
        expect(page.get_by_test_id(control)).to_be_disabled()
    emptied = session_info(playground_server, session_id)
    assert (emptied["tokens"], emptied["rewind_points"]) == (0, 0)
    expect(page.get_by_test_id("prob-bars")).not_to_have_attribute("data-step", "next")


def test_a_failed_undo_shows_the_api_error_and_leaves_the_words(
    page: Page, playground_server: ServerProcess
) -> None:
    log = open_playground(page, playground_server)
    set_controls(page, max_tokens="5")
    generate_and_wait(page)
    session_id = log.of_type("session")[0]["session_id"]
    # another client takes the call back first: the server has nothing left to undo
    out_of_band = httpx.post(
        f"{playground_server.base_url}/v1/sessions/{session_id}/rewind", json={"turns": 1}
    )
    assert out_of_band.status_code == 200

    undo = page.get_by_test_id("undo")
    with page.expect_response(lambda r: r.url.endswith(f"/{session_id}/rewind")) as rewind:
        undo.click()
    assert rewind.value.status == 409
    refused = rewind.value.json()["error"]
    assert refused["code"] == "rewind_too_far"
    error = page.get_by_test_id("error")
    expect(error).to_contain_text("Rewind too far")
    expect(error).to_contain_text(refused["message"])
    expect(error).to_contain_text("HTTP 409")
    expect(page.get_by_test_id("run-state")).to_contain_text("Undo failed")
    expect(page.get_by_test_id("token")).to_have_count(5)
    expect(undo).to_be_disabled()  # the page asked again: no rewind points left


def test_the_next_word_panel_peeks_at_the_idle_session(
    page: Page, playground_server: ServerProcess
) -> None:
    log = open_playground(page, playground_server)
    set_controls(page, temperature="0.7", max_tokens="6", seed="3")
    generate_and_wait(page)
    session_id = log.of_type("session")[0]["session_id"]
    expect_next_word(page, next_words(playground_server, session_id, 0.7))

    # an earlier word still shows the step it was drawn from; Esc goes back to the next word
    steps = log.steps()
    page.get_by_test_id("token").nth(2).click()
    expect_distribution(page, steps[2], 2)
    page.get_by_test_id("output").press("Escape")
    expect_next_word(page, next_words(playground_server, session_id, 0.7))

    # a new temperature, once set, is a new distribution
    temperature = page.get_by_test_id("temperature")
    temperature.fill("1.5")
    temperature.press("Tab")
    expect_next_word(page, next_words(playground_server, session_id, 1.5))

    # at temperature 0 (shown at 1) Continue draws the likeliest word it may: generation
    # bans [UNK] (SIMMER_BAN_UNK, on by default), the peek does not
    temperature.fill("0")
    temperature.press("Tab")
    greedy = next_words(playground_server, session_id, 1.0)
    expect_next_word(page, greedy, greedy=True)
    generate_and_wait(page, "continue")
    drawable = [w["token"] for w in greedy["top"] if w["token"] != "[UNK]"]
    wait_until(page, lambda: len(log.of_type("done")) == 2, "the second done event")
    assert log.steps()[6]["token"] == drawable[0]
    expect_next_word(page, next_words(playground_server, session_id, 1.0), greedy=True)

    # after an undo, the next word is the one from before the undone call
    page.get_by_test_id("undo").click()
    expect(page.get_by_test_id("token-count")).to_have_text("6")
    expect_next_word(page, next_words(playground_server, session_id, 1.0), greedy=True)


def test_try_another_ending_forks_the_session_and_writes_the_last_call_again(
    page: Page, playground_server: ServerProcess
) -> None:
    log = open_playground(page, playground_server)
    set_controls(page, temperature="0", max_tokens="6")  # greedy: the fork's ending is known
    another = page.get_by_test_id("another-ending")
    endings = page.get_by_test_id("endings")
    status = page.get_by_test_id("endings-state")
    branch_ids = page.get_by_test_id("branch-session")
    branch_texts = page.get_by_test_id("branch-text")
    expect(another).to_be_disabled()
    expect(endings).to_be_hidden()
    generate_and_wait(page)
    generate_and_wait(page, "continue")
    session_id = log.of_type("session")[0]["session_id"]
    ending_a = texts_by_call(page, log, 2)[1].strip()

    with (
        page.expect_response(lambda r: r.url.endswith(f"/{session_id}/fork")) as forked,
        page.expect_request(lambda r: r.url.endswith("/v1/generate")) as generated,
    ):
        another.click()
    fork = forked.value.json()
    fork_id = fork["session_id"]
    assert forked.value.status == 201
    assert fork_id != session_id
    expect(endings).to_be_visible()
    expect(status).to_have_text("Ending B done: 6 words, reached max tokens.")
    expect(branch_ids).to_have_text([session_id, fork_id])
    expect(branch_texts).to_have_text([ending_a, ending_a])  # greedy from the same start
    expect(page.get_by_test_id("branch-words")).to_have_text(["6", "6"])
    expect(page.get_by_test_id("endings-start")).to_contain_text("Both endings continue")
    sent = posted(generated.value)
    assert sent["session_id"] == fork_id and sent["stream"] is True
    assert (sent["prompt"], sent["max_tokens"], sent["temperature"]) == ("", 6, 0)
    # the fork began as the session is now, and was written again from one call back
    main = session_info(playground_server, session_id)
    assert fork["tokens"] == main["tokens"]
    assert session_info(playground_server, fork_id)["tokens"] == main["tokens"]
    expect(page.get_by_test_id("output")).to_contain_text(ending_a)  # the session is as it was

    # side by side on a wide page, stacked on a narrow one; readable in both schemes
    a, b = (branch.bounding_box() for branch in page.get_by_test_id("branch").all())
    assert a is not None and b is not None and a["y"] == b["y"] and b["x"] > a["x"]
    page.set_viewport_size({"width": 420, "height": 900})
    a, b = (branch.bounding_box() for branch in page.get_by_test_id("branch").all())
    assert a is not None and b is not None and b["y"] >= a["y"] + a["height"]
    assert page.evaluate(UNLABELLED_CONTROLS) == []
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        assert page.evaluate(LOW_CONTRAST_TEXT) == [], scheme
    page.set_viewport_size({"width": 1280, "height": 900})

    # again: a new fork replaces ending B, and the old one is deleted
    with (
        page.expect_response(lambda r: r.request.method == "DELETE") as deleted,
        page.expect_response(lambda r: r.url.endswith(f"/{session_id}/fork")) as again,
    ):
        another.click()
    assert deleted.value.url.endswith(f"/v1/sessions/{fork_id}")
    assert deleted.value.status == 204
    expect(status).to_contain_text("Ending B done")
    expect(branch_ids.nth(1)).to_have_text(again.value.json()["session_id"])

    # after a first call, the fork writes it again from the prompt
    page.get_by_test_id("prompt").fill("recipe for soup")
    generate_and_wait(page)
    expect(endings).to_be_hidden()  # a new run: its endings are of another call
    with page.expect_request(lambda r: r.url.endswith("/v1/generate")) as generated:
        another.click()
    assert posted(generated.value)["prompt"] == "recipe for soup"
    expect(page.get_by_test_id("endings-start")).to_contain_text("the prompt “recipe for soup”")
    first_call = texts_by_call(page, log, 3)[2].strip()
    expect(branch_texts).to_have_text([first_call, first_call])

    page.get_by_test_id("endings-close").click()
    expect(endings).to_be_hidden()
    expect(another).to_be_focused()


def test_the_controls_are_disabled_while_the_session_or_its_fork_generates(
    page: Page, playground_server: ServerProcess
) -> None:
    log = open_playground(page, playground_server)
    set_controls(page, max_tokens="12")
    generate_and_wait(page)

    # every word of a run arrives with Generate, Continue, Undo and another ending off
    page.evaluate(RECORD_BUTTONS, "[data-testid=output]")
    generate_and_wait(page, "continue")
    records: list[Message] = page.evaluate("window.buttonRecords")
    assert records and all(r["disabled"] == BUSY for r in records)
    for control in ("generate", "continue", "undo", "another-ending"):
        expect(page.get_by_test_id(control)).to_be_enabled()
    expect(page.get_by_test_id("stop")).to_be_disabled()

    # and every word of the fork's ending too; they come back when it is done
    page.evaluate(RECORD_BUTTONS, "[data-testid=endings]")
    page.get_by_test_id("another-ending").click()
    status = page.get_by_test_id("endings-state")
    expect(status).to_contain_text("Ending B done")
    records = page.evaluate("window.buttonRecords")
    writing = [r for r in records if r["endings"] == "Writing ending B…"]
    assert writing and all(r["disabled"] == BUSY for r in writing)
    assert records[-1]["disabled"] == {**dict.fromkeys(BUSY, False), "stop": True}

    # Esc stops a long fork as it stops a run; the session is not touched
    set_controls(page, max_tokens="100000")
    page.get_by_test_id("another-ending").click()
    expect(status).to_have_text("Writing ending B…")
    expect(page.get_by_test_id("branch-text").nth(1)).not_to_have_text("Writing…")
    expect(page.get_by_test_id("stop")).to_be_enabled()
    page.keyboard.press("Escape")
    expect(status).to_contain_text("Ending B stopped after")
    expect(page.get_by_test_id("branch-finish").nth(1)).to_have_text("cancelled")
    expect(page.get_by_test_id("stop")).to_be_disabled()
    expect(page.get_by_test_id("another-ending")).to_be_enabled()
    session_id = log.of_type("session")[0]["session_id"]
    assert session_info(playground_server, session_id)["rewind_points"] == 2
