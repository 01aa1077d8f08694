"""One generate call in flight: its session, its engine request, and what it has sent."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from service.engine.request import Request, TopLogprobs
from service.engine.text import TextStream
from service.generation.events import Logprob, PromptToken, TokenEvent
from service.generation.lease import SessionLease
from service.generation.observer import GenerationObserver
from service.sessions import NO_TOKEN, SessionState
from service.sessions.state import Snapshot
from simmer.tokenizer import Tokenizer


def context_of(state: SessionState, tokens: list[int]) -> list[int]:
    """The session's last two tokens before `tokens`, then `tokens`."""
    return [t for t in (state.prev, state.last) if t != NO_TOKEN] + tokens


@dataclass(eq=False)
class Call:
    session_id: str
    created: bool
    state: SessionState  # the session as this call found it
    prompt_ids: list[int]
    request: Request
    text: TextStream
    observer: GenerationObserver
    lease: SessionLease
    tokenizer: Tokenizer
    feed: int  # tokens the engine feeds for this call: the pending token and the prompt
    keep: int = 8  # call starts the session keeps for rewinding
    choice: int | None = None  # with n > 1: which choice this call is
    group: str | None = None  # with n > 1: a token the call's choices share, to stop them all
    prompt: tuple[PromptToken, ...] | None = None  # with echo: the prompt, scored
    return_state: bool = False
    client_gone: bool = False  # its client left: counted as a disconnect, not a success
    shown_chars: int = 0
    sent_tokens: int = 0
    logprobs: bool = field(init=False)  # whether its token events carry logprobs
    start: Snapshot = field(init=False)  # the session before this call, to rewind to

    def __post_init__(self) -> None:
        self.logprobs = self.request.params.logprobs > 0
        self.start = self.state.snapshot()

    def next_event(self) -> TokenEvent | None:
        """The tokens and text that may go out now (text that could still turn out to
        begin a stop string is held back), or None when there is nothing new."""
        request, text = self.request, self.text
        done = request.done
        produced = len(request.tokens)
        if produced <= self.sent_tokens and not done:
            return None
        safe = text.safe_length(done)
        if safe <= self.shown_chars and not (produced > self.sent_tokens and not text.stop):
            return None
        first, count = self.sent_tokens, max(1, produced - self.sent_tokens)
        self.observer.tokens(count)
        event = TokenEvent(
            text=text.text[self.shown_chars : safe],
            index=first,
            count=count,
            logprobs=self._logprobs(first, produced) if self.logprobs else None,
            offsets=tuple(text.ends[i - 1] if i else 0 for i in range(first, produced)),
            choice=self.choice,
        )
        self.shown_chars, self.sent_tokens = safe, produced
        return event

    def _logprobs(self, start: int, end: int) -> list[Logprob]:
        vocab = self.tokenizer.vocab
        request = self.request
        return [
            _logprob(vocab, token, top)
            for token, top in zip(request.tokens[start:end], request.top[start:end], strict=False)
        ]

    def saved_state(self) -> SessionState:
        """The session after this call: only what the engine actually fed."""
        state, request = self.state, self.request
        if request.steps_run:
            state.remember(self.start, self.keep)
            state.h, state.c = request.h, request.c
            context = context_of(state, self.prompt_ids + request.tokens)
            state.prev = context[-2] if len(context) >= 2 else NO_TOKEN
            state.last = context[-1] if context else NO_TOKEN
            state.pending = request.feed[0] if request.feed else NO_TOKEN
            state.n_tokens += len(self.prompt_ids) + len(request.tokens)
        state.last_used = time.time()
        return state

    @property
    def fed_tokens(self) -> int:
        return self.feed if self.request.steps_run else 0

    def mean_logprob(self) -> float | None:
        """The mean log-probability of the generated tokens, when they were scored."""
        top = self.request.top
        return sum(t.logprob for t in top) / len(top) if top else None


def _logprob(vocab: list[str], token: int, top: TopLogprobs) -> Logprob:
    words = tuple(
        Logprob(vocab[int(i)], int(i), float(lp))
        for i, lp in zip(top.ids, top.logprobs, strict=True)
    )
    return Logprob(vocab[token], token, top.logprob, words)
