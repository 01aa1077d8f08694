"""Prompt -> tokens -> events: sessions, the scheduler and the tokenizer, put together.

`GenerationService.generate` yields a `SessionEvent`, then `TokenEvent`s as tokens
arrive (several tokens in one event when the consumer falls behind), then one
`DoneEvent` with exact usage. The session's new state is stored before the done event
is produced, so a call that returned has always been saved; a call cut off part-way
leaves the session as the last completed call left it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field, replace

import numpy as np

from service.errors import (
    APIError,
    engine_unavailable,
    invalid,
    overloaded,
    session_expired,
    session_not_found,
    store_unavailable,
)
from service.metrics import Metrics
from service.protocol import GenerationRequest
from service.sampling import SamplingParams
from service.scheduler import (
    DecodeScheduler,
    EngineDown,
    SchedulerClosed,
    Sequence,
    TopLogprobs,
)
from service.sessions import NO_TOKEN, SessionState, SessionStore, StoreUnavailable, new_session_id
from simmer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionEvent:
    session_id: str
    created: bool


@dataclass(frozen=True)
class WordProb:
    token: str
    id: int
    logprob: float


@dataclass(frozen=True)
class StepLogprobs:
    token: str
    id: int
    logprob: float
    top: list[WordProb]


@dataclass(frozen=True)
class TokenEvent:
    text: str
    index: int  # index of the first generated token this event covers
    count: int  # how many generated tokens it covers
    logprobs: list[StepLogprobs] | None = None


@dataclass(frozen=True)
class DoneEvent:
    session_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


Event = SessionEvent | TokenEvent | DoneEvent


@dataclass
class _TextStream:
    """Incremental detokenisation with stop strings; runs in the scheduler's loop."""

    tokenizer: Tokenizer
    prev: int
    last: int
    stop: tuple[str, ...]
    text: str = ""
    ends: list[int] = field(default_factory=list)  # text length after each token
    cut: int | None = None  # where a stop string begins

    def add(self, token: int) -> str | None:
        piece = self.tokenizer.piece(
            None if self.prev == NO_TOKEN else self.prev,
            None if self.last == NO_TOKEN else self.last,
            token,
        )
        self.prev, self.last = self.last, token
        self.text += piece
        self.ends.append(len(self.text))
        if self.stop:
            window = max(map(len, self.stop)) + len(piece)
            start = max(0, len(self.text) - window)
            hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.cut = min(hits)
                return "stop"
        return None

    def safe_length(self, done: bool) -> int:
        """How much text may be shown: all when done, else all but a possible stop prefix."""
        if self.cut is not None:
            return self.cut
        if done or not self.stop:
            return len(self.text)
        hold = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        return len(self.text) - hold


def seeded_for(params: SamplingParams, context_tokens: int) -> SamplingParams:
    """The seed a call really uses: the request's seed, mixed with how far the session has
    come. A seeded call is reproducible from the same session state, and continuing with
    the same seed does not replay the draws of the call before it."""
    if params.seed is None or context_tokens == 0:
        return params
    mixed = np.random.SeedSequence([params.seed, context_tokens]).generate_state(2, np.uint64)
    return replace(params, seed=int(mixed[0]) >> 1)


class _Lock:
    """A session's generation lock, released once, as early as it safely can be."""

    def __init__(self, store: SessionStore, session_id: str) -> None:
        self.store = store
        self.session_id = session_id
        self.held = True
        self.handed_off = False  # a finisher task releases it once the session is saved

    async def release(self, final: bool = False) -> None:
        if self.handed_off and not final:
            return
        if self.held:
            self.held = False
            with contextlib.suppress(StoreUnavailable):
                await asyncio.shield(self.store.unlock(self.session_id))


class GenerationService:
    def __init__(
        self,
        scheduler: DecodeScheduler,
        store: SessionStore,
        tokenizer: Tokenizer,
        metrics: Metrics,
        *,
        model_version: str,
        num_layers: int,
        hidden_size: int,
        max_prompt_tokens: int,
        session_ttl_s: float,
        max_batch: int,
        max_waiting: int,
    ) -> None:
        self.scheduler = scheduler
        self.store = store
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.model_version = model_version
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.max_prompt_tokens = max_prompt_tokens
        self.session_ttl_s = session_ttl_s
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.active = 0  # generations in progress (admitted)
        self._running: dict[str, Sequence] = {}
        self._finishers: set[asyncio.Task[None]] = set()
        self.draining = False
        self._idle = asyncio.Event()  # set while no generation is in progress
        self._idle.set()

    # --- sessions -------------------------------------------------------------------

    async def _store(self, op: str, *args: object) -> object:
        try:
            return await getattr(self.store, op)(*args)
        except StoreUnavailable as exc:
            raise store_unavailable(str(exc)) from exc

    async def load(self, session_id: str, owner: str) -> SessionState:
        state = await self._store("get", session_id)
        if state is None and await self._store("expired", session_id):
            raise session_expired(session_id, self.session_ttl_s)
        if not isinstance(state, SessionState) or state.owner != owner:
            # another key's session looks exactly like a missing one: ids cannot be probed
            raise session_not_found(session_id, self.session_ttl_s)
        if state.model != self.model_version:
            raise APIError(
                409,
                "session_model_mismatch",
                f"session {session_id!r} belongs to model {state.model}, not {self.model_version}",
                "session_id",
            )
        return state

    async def create_session(
        self, owner: str, state: SessionState | None = None
    ) -> tuple[str, SessionState]:
        """A new session: fresh, or holding an imported state."""
        session_id = new_session_id()
        if state is None:
            state = SessionState.fresh(self.num_layers, self.hidden_size, owner, self.model_version)
        state.owner = owner
        state.last_used = time.time()
        await self._store("put", session_id, state)
        self.metrics.sessions_created.inc()
        return session_id, state

    async def delete_session(self, session_id: str, owner: str) -> None:
        await self.load(session_id, owner)
        if not await self._store("lock", session_id):
            raise APIError(
                409,
                "session_busy",
                f"session {session_id!r} is generating; cancel it first",
                "session_id",
            )
        try:
            await self._store("delete", session_id)
        finally:
            await self._store("unlock", session_id)

    def expires_at(self, state: SessionState) -> float:
        return state.last_used + self.session_ttl_s

    # --- generation -----------------------------------------------------------------

    def held_sessions(self) -> list[str]:
        """Sessions whose generation lock this server holds right now."""
        return list(self._running)

    def cancel(self, session_id: str, client_gone: bool = False) -> bool:
        """Ask the generation running on `session_id` to stop within one step; with
        `client_gone` it is counted as a client that disconnected, not as a success."""
        seq = self._running.get(session_id)
        if seq is None:
            return False
        seq.detached = seq.detached or client_gone
        seq.cancel()
        return True

    def stopper(self, session_id: str) -> Callable[[], bool]:
        """What stops `session_id`'s generation when its client has gone."""
        return functools.partial(self.cancel, session_id, client_gone=True)

    def _admit(self) -> None:
        if self.draining:
            raise APIError(
                503,
                "shutting_down",
                "the server is shutting down; retry on another replica",
                None,
                {"Retry-After": "1"},
            )
        if self.active >= self.max_batch + self.max_waiting:
            raise overloaded()  # counted where it is answered, like every APIError

    async def drain(self, grace_s: float) -> int:
        """Refuse new work, give running generations `grace_s`, then end the rest.

        Returns how many generations were ended early. Each one still saves its session
        and sends a done event with finish_reason "shutdown".
        """
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        ended = 0
        for seq in list(self._running.values()):
            if not seq.done:
                seq.stop("shutdown")
                ended += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 5.0)
        return ended

    async def generate(
        self, request: GenerationRequest, owner: str = ""
    ) -> AsyncGenerator[Event, None]:
        """Events for one generation; raises APIError before the first event on bad input."""
        arrived = time.perf_counter()
        prompt_ids = self.tokenizer.encode(request.prompt)
        if len(prompt_ids) > self.max_prompt_tokens:
            raise invalid(
                f"prompt is {len(prompt_ids)} tokens; the limit is {self.max_prompt_tokens}",
                "prompt",
            )
        self._admit()
        if request.session_id is not None:
            session_id, created = request.session_id, False
            state = await self.load(session_id, owner)
        else:
            session_id, created = new_session_id(), True
            state = SessionState.fresh(self.num_layers, self.hidden_size, owner, self.model_version)
        feed = ([state.pending] if state.pending != NO_TOKEN else []) + prompt_ids
        if not feed:
            raise invalid("prompt is empty and the session has nothing to continue from", "prompt")
        if not await self._store("lock", session_id):
            raise APIError(
                409, "session_busy", f"session {session_id!r} is already generating", "session_id"
            )
        lock = _Lock(self.store, session_id)
        try:
            if created:
                self.metrics.sessions_created.inc()
            async for event in self._run(
                request, session_id, created, state, prompt_ids, feed, arrived, lock
            ):
                yield event
        finally:
            await lock.release()

    async def _run(
        self,
        request: GenerationRequest,
        session_id: str,
        created: bool,
        state: SessionState,
        prompt_ids: list[int],
        feed: list[int],
        arrived: float,
        lock: _Lock,
    ) -> AsyncGenerator[Event, None]:
        context = [t for t in (state.prev, state.last) if t != NO_TOKEN] + prompt_ids
        stream = _TextStream(
            self.tokenizer,
            context[-2] if len(context) >= 2 else NO_TOKEN,
            context[-1] if context else NO_TOKEN,
            request.stop,
        )
        seq = Sequence(
            feed=feed,
            h=state.h,
            c=state.c,
            params=seeded_for(request.sampling, state.n_tokens),
            max_new_tokens=request.max_tokens,
            check=stream.add,
        )
        metrics = self.metrics
        self.active += 1
        self._idle.clear()
        submitted = saved_later = False
        try:
            try:
                self.scheduler.submit(seq)
                submitted = True
            except EngineDown as exc:
                raise engine_unavailable(str(exc)) from exc
            except SchedulerClosed as exc:
                raise APIError(503, "shutting_down", str(exc), None, {"Retry-After": "1"}) from exc
            self._running[session_id] = seq
            yield SessionEvent(session_id, created)
            shown_chars = 0
            sent_tokens = 0
            last_token_at: float | None = None
            while True:
                await seq.event.wait()
                seq.event.clear()
                done = seq.done
                produced = len(seq.tokens)
                if produced > sent_tokens or done:
                    safe = stream.safe_length(done)
                    if safe > shown_chars or (produced > sent_tokens and not request.stop):
                        now = time.perf_counter()
                        if last_token_at is None:
                            metrics.time_to_first_token.observe(now - arrived)
                        else:
                            # one observation per token, so bunched tokens weigh what they cost
                            gap = max(1, produced - sent_tokens)
                            metrics.inter_token_latency.observe_many(
                                (now - last_token_at) / gap, gap
                            )
                        last_token_at = now
                        yield TokenEvent(
                            text=stream.text[shown_chars:safe],
                            index=sent_tokens,
                            count=max(1, produced - sent_tokens),
                            logprobs=self._logprobs(
                                seq.tokens[sent_tokens:produced], seq.top[sent_tokens:produced]
                            )
                            if request.sampling.logprobs
                            else None,
                        )
                        shown_chars = safe
                        sent_tokens = produced
                if done:
                    break
            finish_reason = seq.finish_reason or "error"
            if finish_reason == "error":
                # the engine failed this step: the session stays as its last call left it
                raise APIError(500, "engine_error", "the engine failed during this generation")
            saving = asyncio.ensure_future(self._save(session_id, state, seq, prompt_ids))
            try:
                await asyncio.shield(saving)
            except asyncio.CancelledError:
                # The consumer was cancelled while the session was being written (its client
                # left): the write goes on in its own task, which unlocks the session only
                # once the state is stored, so nobody continues from the state before it.
                lock.handed_off = saved_later = True
                self._finish_for_gone_client(session_id, saving, lock)
                raise
            metrics.prompt_tokens.inc(len(prompt_ids))
            metrics.generation_tokens.inc(len(seq.tokens))
            metrics.request_prompt_tokens.observe(len(prompt_ids))
            metrics.request_generation_tokens.observe(len(seq.tokens))
            metrics.e2e_latency.observe(time.perf_counter() - arrived)
            if seq.detached:
                metrics.request_failure.labels(code="client_disconnected").inc()
            else:
                metrics.request_success.labels(finish_reason=finish_reason).inc()
            await lock.release()  # the session is saved: the client may continue right away
            yield DoneEvent(session_id, finish_reason, len(prompt_ids), len(seq.tokens))
        finally:
            if submitted and not seq.done:
                # The consumer went away (its task may be cancelled over and over, as anyio
                # does): a task of its own stops the sequence within one step, saves what
                # completed, then unlocks the session and frees the slot.
                seq.cancel()
                lock.handed_off = True
                self._finish_for_gone_client(
                    session_id, self._save_when_stopped(session_id, state, seq, prompt_ids), lock
                )
            elif not saved_later:
                self._retire(session_id)

    def _retire(self, session_id: str) -> None:
        self._running.pop(session_id, None)
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    def _finish_for_gone_client(
        self, session_id: str, saving: Awaitable[None], lock: _Lock
    ) -> None:
        """In a task of its own: wait for `saving` to store the session, count the
        disconnect, then free the generation's place and unlock the session."""

        async def finish() -> None:
            try:
                await saving
                self.metrics.request_failure.labels(code="client_disconnected").inc()
            except Exception:
                logger.exception("could not save session %s after its client left", session_id[:8])
            finally:
                self._retire(session_id)
                await lock.release(final=True)

        finisher = asyncio.create_task(finish())
        self._finishers.add(finisher)  # kept alive until done
        finisher.add_done_callback(self._finishers.discard)

    async def _save_when_stopped(
        self, session_id: str, state: SessionState, seq: Sequence, prompt_ids: list[int]
    ) -> None:
        while not seq.done:
            seq.event.clear()
            await seq.event.wait()
        if seq.finish_reason != "error":  # an engine failure leaves the last saved state
            await self._save(session_id, state, seq, prompt_ids)

    async def _save(
        self, session_id: str, state: SessionState, seq: Sequence, prompt_ids: list[int]
    ) -> None:
        """The session after this call: only what the engine actually fed."""
        if seq.steps_run:
            state.h, state.c = seq.h, seq.c
            context = (
                [t for t in (state.prev, state.last) if t != NO_TOKEN] + prompt_ids + seq.tokens
            )
            state.prev = context[-2] if len(context) >= 2 else NO_TOKEN
            state.last = context[-1] if context else NO_TOKEN
            state.pending = seq.feed[0] if seq.feed else NO_TOKEN
            state.n_tokens += len(prompt_ids) + len(seq.tokens)
        state.last_used = time.time()
        if not await self._store("put_locked", session_id, state):
            # the lock lapsed (this server stalled, or lost the store for too long): another
            # replica may have continued the session since, and its state must stand
            raise APIError(
                409,
                "session_lock_lost",
                f"session {session_id!r} lost its generation lock; this call was not saved",
                "session_id",
            )

    def _logprobs(self, tokens: list[int], tops: list[TopLogprobs]) -> list[StepLogprobs]:
        vocab = self.tokenizer.vocab
        out = []
        for token, top in zip(tokens, tops, strict=False):
            out.append(
                StepLogprobs(
                    token=vocab[token],
                    id=token,
                    logprob=top.logprob,
                    top=[
                        WordProb(vocab[int(i)], int(i), float(lp))
                        for i, lp in zip(top.ids, top.logprobs, strict=True)
                    ],
                )
            )
        return out
