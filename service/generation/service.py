"""Prompt -> tokens -> events: sessions, the engine and the tokenizer, put together.

`GenerationService.generate` yields a `SessionEvent`, then `TokenEvent`s as tokens
arrive (several tokens in one event when the consumer falls behind), then one
`DoneEvent` with exact usage. The session's new state is stored before the done event
is produced, so a call that returned has always been saved; a call cut off part-way
leaves the session as the last completed call left it, and one the engine failed
leaves it as it was. A consumer that goes away stops its generation within one step;
what it generated is saved, then its lease is given back, in a task of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass, replace

import numpy as np

from service.engine.core import EngineClosed, EngineCore, EngineDown
from service.engine.params import SamplingParams, seeded_for
from service.engine.request import Request, TopLogprobs
from service.engine.scoring import Scorer
from service.engine.text import TextStream
from service.errors import (
    EngineFailed,
    EngineUnavailable,
    InvalidRequest,
    NothingToPredict,
    SessionLockLost,
    ShuttingDown,
)
from service.generation.admission import Admission
from service.generation.call import Call, context_of
from service.generation.events import DoneEvent, Event, Logprob, PromptToken, SessionEvent
from service.generation.lease import SessionLease
from service.generation.observer import GenerationObserver
from service.generation.sessions import ModelShape, Sessions, StateTokens
from service.metrics import Metrics
from service.protocol import MAX_SEED, GenerationRequest
from service.sessions import NO_TOKEN, SessionState, SessionStore, new_session_id
from simmer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class GenerationService:
    def __init__(
        self,
        engine: EngineCore,
        store: SessionStore,
        tokenizer: Tokenizer,
        metrics: Metrics,
        *,
        model: ModelShape,
        max_prompt_tokens: int,
        session_ttl_s: float,
        max_waiting: int,
        session_history: int = 8,
        state_tokens: StateTokens | None = None,
        scorer: Scorer | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.model = model
        self.max_prompt_tokens = max_prompt_tokens
        self.sessions = Sessions(
            store, model, session_ttl_s, metrics, history=session_history, tokens=state_tokens
        )
        self.admission = Admission(engine.max_batch + max_waiting)
        self.scorer = scorer  # echo: scores prompts off the decode engine (None: unavailable)
        self._scoring = asyncio.Semaphore(1)  # one prompt scored at a time, on one core
        self._calls: dict[str, Call] = {}  # by session id
        self._leases: set[SessionLease] = set()  # taken by generations, until released
        self._finishers: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> int:
        return self.admission.active

    @property
    def draining(self) -> bool:
        return self.admission.draining

    # --- control --------------------------------------------------------------------

    def held_sessions(self) -> list[str]:
        """Sessions whose generation lock this server holds right now: those generating,
        and those still scoring or prefilling before they do (their locks need renewing
        just the same)."""
        self._leases = {lease for lease in self._leases if lease.held}
        return list(set(self._calls) | {lease.session_id for lease in self._leases})

    def _lease(self, session_id: str) -> SessionLease:
        lease = SessionLease(self.store, session_id)
        self._leases.add(lease)
        return lease

    def cancel(self, session_id: str, client_gone: bool = False) -> bool:
        """Stop the generation running on `session_id` now (with n > 1, when it is
        choice 0's, every choice of that call); with `client_gone` it is counted as a
        client that disconnected, not as a success."""
        call = self._calls.get(session_id)
        return self._cancel(call.group if call and call.group else session_id, client_gone)

    def _cancel(self, key: str, client_gone: bool) -> bool:
        """Stop the call on session `key`, or every choice of the call group `key`."""
        calls = [c for c in self._calls.values() if key in (c.session_id, c.group)]
        for call in calls:
            call.client_gone = call.client_gone or client_gone
            self.engine.cancel(call.request)
        return bool(calls)

    def stopper(self, session_id: str) -> functools.partial[bool]:
        """What stops `session_id`'s generation when its client has gone (with n > 1,
        all of the call's choices, even once choice 0 has finished)."""
        call = self._calls.get(session_id)
        key = call.group if call and call.group else session_id
        return functools.partial(self._cancel, key, client_gone=True)

    async def drain(self, grace_s: float) -> int:
        """Refuse new work, give running generations `grace_s`, then end the rest.

        Returns how many generations were ended early. Each one still saves its session
        and sends a done event with finish_reason "shutdown".
        """

        def stop_all() -> int:
            running = [call for call in self._calls.values() if not call.request.done]
            for call in running:
                self.engine.cancel(call.request, "shutdown")
            return len(running)

        return await self.admission.drain(grace_s, stop_all)

    # --- generation -----------------------------------------------------------------

    async def generate(
        self, request: GenerationRequest, owner: str = ""
    ) -> AsyncGenerator[Event, None]:
        """Events for one generation; raises a DomainError before the first event on bad
        input."""
        arrived = time.perf_counter()
        prompt_ids = self.tokenizer.encode(request.prompt)
        if len(prompt_ids) > self.max_prompt_tokens:
            raise InvalidRequest(
                f"prompt is {len(prompt_ids)} tokens; the limit is {self.max_prompt_tokens}",
                "prompt",
            )
        self.admission.check(request.n)
        session_id, created, state = await self._session_for(request, owner)
        feed = ([state.pending] if state.pending != NO_TOKEN else []) + prompt_ids
        if not feed:
            raise InvalidRequest(
                "prompt is empty and the session has nothing to continue from", "prompt"
            )
        if request.echo and self.scorer is None:
            raise InvalidRequest(
                "echo needs the bundle's scoring graph (sequence_logprobs): export the model again",
                "echo",
            )
        plan = _Plan(request, prompt_ids, feed, arrived)
        if request.n > 1:
            choices = self._choices(plan, session_id, created, state, owner)
            async with contextlib.aclosing(choices):
                async for event in choices:
                    yield event
            return
        async with self._lease(session_id) as lease:
            if created:
                self.metrics.sessions_created.inc()
            h, c, rest, prompt = state.h, state.c, feed, None
            if request.echo:  # the scorer feeds all but the last token, scoring each
                prompt, h, c = await self._score(plan, state)
                rest = feed[-1:]
                if request.max_tokens == 0:
                    yield SessionEvent(session_id, created, prompt=prompt)
                    done = await self._save_scored(plan, session_id, state, h, c)
                    await lease.release()  # saved: the client may continue right away
                    yield done
                    return
            call = self._start(plan, session_id, created, state, lease, h, c, rest)
            call.prompt = prompt
            events = self._events(call)
            try:
                async for event in events:
                    yield event
            finally:
                await events.aclose()

    async def _score(
        self, plan: _Plan, state: SessionState
    ) -> tuple[tuple[PromptToken, ...], np.ndarray, np.ndarray]:
        """Score the prompt (echo) in a worker thread, off the decode engine: each prompt
        token's logprob at temperature 1 and the top words at its step, and the state
        after all of the feed but its last token (which is then fed as usual)."""
        assert self.scorer is not None
        feed, k = plan.feed, plan.request.sampling.logprobs
        async with self._scoring:
            scores = await asyncio.to_thread(
                self.scorer.score, state.h, state.c, feed[:-1], k, feed[-1]
            )
        vocab = self.tokenizer.vocab
        before = len(feed) - len(plan.prompt_ids)  # 1 with a pending token, else 0
        prompt = []
        for index, token in enumerate(plan.prompt_ids, before):
            if index == 0:  # the first token of an empty session: nothing before it
                prompt.append(PromptToken(vocab[token], token, None))
                continue
            row = index - 1
            top = tuple(
                Logprob(vocab[int(i)], int(i), float(lp))
                for i, lp in zip(scores.top_ids[row], scores.top_logprobs[row], strict=True)
            )
            prompt.append(PromptToken(vocab[token], token, float(scores.next_logprobs[row]), top))
        return tuple(prompt), scores.h, scores.c

    async def _save_scored(
        self, plan: _Plan, session_id: str, state: SessionState, h: np.ndarray, c: np.ndarray
    ) -> DoneEvent:
        """Save a call that only scored its prompt (echo, max_tokens 0): the session has
        fed all of it but the last token, which waits as the pending one."""
        observer = GenerationObserver(self.metrics, plan.arrived)
        state.remember(state.snapshot(), self.sessions.history)
        context = context_of(state, plan.prompt_ids)
        state.h, state.c = h, c
        state.prev = context[-2] if len(context) >= 2 else NO_TOKEN
        state.last = state.pending = plan.feed[-1]
        state.n_tokens += len(plan.prompt_ids)
        state.last_used = time.time()
        if not await self.store.put_locked(session_id, state):
            raise SessionLockLost(
                f"session {session_id!r} lost its generation lock; this call was not saved",
                "session_id",
            )
        observer.finished(len(plan.prompt_ids), 0)
        observer.outcome("length", False)
        request = plan.request
        return DoneEvent(
            session_id,
            "length",
            len(plan.prompt_ids),
            0,
            fed_tokens=len(plan.feed) - 1,  # the last one waits as the pending token
            session_tokens=state.n_tokens,
            state=self.sessions.seal(state) if request.return_state else None,
        )

    async def peek(
        self,
        session_id: str,
        owner: str,
        top: int,
        temperature: float,
        logit_bias: tuple[tuple[int, float], ...] = (),
    ) -> tuple[SessionState, TopLogprobs]:
        """The session's next-word distribution at `temperature` (after `logit_bias`, the
        server's [UNK] ban, as a generation would see it), its `top` words, from one
        engine step on the pending token; the session is not changed."""
        state = await self.sessions.load(session_id, owner)
        if state.pending == NO_TOKEN:
            raise NothingToPredict(
                f"session {session_id!r} has no context yet: generate, or feed it a prompt, first",
                "session_id",
            )
        # its own seed: the one word it draws (and drops) takes nothing from other requests
        params = SamplingParams(
            temperature=temperature, seed=0, logprobs=top, ignore_eos=True, logit_bias=logit_bias
        )
        request = await self._run_step([state.pending], state, params)
        return state, request.top[0]

    async def _run_step(
        self, tokens: list[int], state: SessionState, params: SamplingParams
    ) -> Request:
        """One engine request that feeds `tokens` from `state` and draws one word (never
        the stop token, so it always ends after that step, by length)."""
        self.admission.check()
        request = self._submit(
            Request(feed=tokens, h=state.h, c=state.c, params=params, max_new_tokens=1)
        )
        try:
            while not request.done:
                await request.event.wait()
                request.event.clear()
        except BaseException:
            self.engine.cancel(request)
            raise
        finally:
            self.admission.leave()
        if request.finish_reason == "shutdown":
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if request.finish_reason != "length" or request.steps_run != 1:
            raise EngineFailed("the engine failed during this generation")
        return request

    async def _session_for(
        self, request: GenerationRequest, owner: str
    ) -> tuple[str, bool, SessionState]:
        """The session a call continues, or a new one: (id, created, state). A call from
        a state token makes a new session of it, without reading the store."""
        if request.session_id is not None:
            return request.session_id, False, await self.sessions.resume(request.session_id, owner)
        if request.state is not None:
            return new_session_id(), True, self.sessions.unseal(request.state, owner, resume=True)
        return new_session_id(), True, self.sessions.fresh(owner)

    def _start(
        self,
        plan: _Plan,
        session_id: str,
        created: bool,
        state: SessionState,
        lease: SessionLease,
        h: np.ndarray,
        c: np.ndarray,
        feed: list[int],
        choice: int | None = None,
        group: str | None = None,
    ) -> Call:
        """Submit one call's engine request, from (h, c) with the rest of its feed."""
        request = plan.request
        context = context_of(state, plan.prompt_ids)
        text = TextStream(self.tokenizer, *_last_two(context), request.stop)
        params = request.sampling
        if choice and params.seed is not None:  # choice i draws as seed + i alone would
            params = replace(params, seed=(params.seed + choice) % (MAX_SEED + 1))
        engine_request = self._submit(
            Request(
                feed=feed,
                h=h,
                c=c,
                params=seeded_for(params, state.n_tokens),
                max_new_tokens=request.max_tokens,
                check=text.add,
            )
        )
        call = Call(
            session_id,
            created,
            state,
            plan.prompt_ids,
            engine_request,
            text,
            GenerationObserver(self.metrics, plan.arrived),
            lease,
            self.tokenizer,
            # what the engine feeds for this call; choice 0 counts the shared prefill
            feed=len(feed) if choice else len(plan.feed),
            keep=self.sessions.history,
            choice=choice,
            return_state=request.return_state,
            group=group,
        )
        self._calls[session_id] = call
        return call

    async def _choices(
        self, plan: _Plan, session_id: str, created: bool, state: SessionState, owner: str
    ) -> AsyncGenerator[Event, None]:
        """n choices: feed all but the last token once, then n forks of that state, each
        feeding the last token and sampling in the same batch. Choice 0 is the session
        the call continues (or a new one); the others are new sessions."""
        n = plan.request.n
        ids = [session_id] + [new_session_id() for _ in range(n - 1)]
        group = secrets.token_hex(8)  # this call's choices, whatever their sessions do next
        async with contextlib.AsyncExitStack() as stack:
            leases = [await stack.enter_async_context(self._lease(i)) for i in ids]
            prompt = None
            if plan.request.echo:  # scoring the prompt is the prefill
                prompt, h, c = await self._score(plan, state)
            else:
                h, c = await self._prefill(plan.feed[:-1], state)
            # No await from here to the merge: all n are admitted at once (or none), and
            # each has a stream running that will save and free it however the call ends.
            self.admission.check(n)
            calls: list[Call] = []
            try:
                for i in range(n):
                    copy = state.copy() if i else state
                    calls.append(
                        self._start(
                            plan,
                            ids[i],
                            created or i > 0,
                            copy,
                            leases[i],
                            h,
                            c,
                            plan.feed[-1:],
                            choice=i,
                            group=group,
                        )
                    )
            except BaseException:
                for call in calls:
                    self.engine.cancel(call.request)
                    self._retire(call)
                raise
            self.metrics.sessions_created.inc(n - 1 + created)
            merged = _Merged([self._events(call, announce=False) for call in calls])
            try:
                for call in calls:
                    scored = prompt if call.choice == 0 else None
                    yield SessionEvent(call.session_id, call.created, call.choice, scored)
                async for event in merged.events():
                    yield event
            finally:
                await merged.close()
                for call, started in zip(calls, merged.started, strict=True):
                    if not started:  # its stream never ran: end and save it here instead
                        self._abandon(call)

    def _abandon(self, call: Call) -> None:
        """A call whose events nobody will read: stop it, then save what it generated
        and free it in a task of its own (a call the engine failed is only freed)."""
        self.engine.cancel(call.request)
        if call.request.finish_reason == "error":
            self._retire(call)
            return
        self._finish_later(call, self._save(call))

    async def _prefill(
        self, tokens: list[int], state: SessionState
    ) -> tuple[np.ndarray, np.ndarray]:
        """The state after feeding `tokens` from `state` (itself when there are none)."""
        if not tokens:
            return state.h, state.c
        params = SamplingParams(temperature=0.0, ignore_eos=True)
        request = await self._run_step(tokens, state, params)
        return request.h, request.c

    def _submit(self, request: Request) -> Request:
        """Admit a generation and hand its request to the engine."""
        self.admission.enter()
        try:
            return self.engine.submit(request)
        except EngineDown as exc:
            self.admission.leave()
            raise EngineUnavailable(str(exc)) from exc
        except EngineClosed as exc:
            self.admission.leave()
            raise ShuttingDown(str(exc)) from exc

    async def _events(self, call: Call, announce: bool = True) -> AsyncGenerator[Event, None]:
        request = call.request
        handed_off = saving_started = False
        try:
            if announce:
                yield SessionEvent(call.session_id, call.created, call.choice, call.prompt)
            while True:
                await request.event.wait()
                request.event.clear()
                # whether it was done *before* this event: tokens kept while the consumer
                # was away at the yield below still go out with the next event
                done = request.done
                event = call.next_event()
                if event is not None:
                    yield event
                if done:
                    break
            if request.finish_reason == "error":
                # the engine failed this step: the session stays as its last call left it
                raise EngineFailed("the engine failed during this generation")
            saving_started = True
            saving = asyncio.ensure_future(self._save(call))
            try:
                await asyncio.shield(saving)
            except asyncio.CancelledError:
                # The consumer was cancelled while the session was being written (its client
                # left): the write goes on in its own task, which gives the lease back only
                # once the state is stored, so nobody continues from the state before it.
                handed_off = True
                self._finish_later(call, saving)
                raise
            call.observer.finished(len(call.prompt_ids), len(request.tokens))
            call.observer.outcome(request.finish_reason or "error", call.client_gone)
            await call.lease.release()  # saved: the client may continue right away
            yield DoneEvent(
                call.session_id,
                request.finish_reason or "error",
                len(call.prompt_ids),
                len(request.tokens),
                fed_tokens=call.fed_tokens,
                session_tokens=call.state.n_tokens,
                choice=call.choice,
                state=self.sessions.seal(call.state) if call.return_state else None,
                mean_logprob=call.mean_logprob(),
            )
        finally:
            if not request.done:
                # The consumer went away mid-generation (its task may be cancelled over and
                # over, as anyio does): stop the request now, and in a task of its own save
                # what it kept, then give the lease back.
                self.engine.cancel(request)
                handed_off = True
                self._finish_later(call, self._save(call))
            elif not saving_started and request.finish_reason != "error":
                # it finished, but its consumer went away before the session was saved
                handed_off = True
                self._finish_later(call, self._save(call))
            if not handed_off:
                self._retire(call)

    async def _save(self, call: Call) -> None:
        if not await self.store.put_locked(call.session_id, call.saved_state()):
            # the lock lapsed (this server stalled, or lost the store for too long): another
            # replica may have continued the session since, and its state must stand
            raise SessionLockLost(
                f"session {call.session_id!r} lost its generation lock; this call was not saved",
                "session_id",
            )

    async def wait_finishers(self, timeout_s: float) -> None:
        """Let the sessions still being saved for gone clients be written (at shutdown)."""
        if self._finishers:
            await asyncio.wait(set(self._finishers), timeout=timeout_s)

    def _retire(self, call: Call) -> None:
        if self._calls.get(call.session_id) is call:
            del self._calls[call.session_id]
        self.admission.leave()

    def _finish_later(self, call: Call, saving: Awaitable[None]) -> None:
        """In a task of its own: wait for `saving` to store the session, count the
        disconnect, then free the call's place and give its lease back."""
        call.lease.hand_off()

        async def finish() -> None:
            try:
                await saving
                self.metrics.failure("client_disconnected")
            except Exception:
                logger.exception(
                    "could not save session %s after its client left", call.session_id[:8]
                )
            finally:
                self._retire(call)
                await call.lease.release()

        finisher = asyncio.create_task(finish())
        self._finishers.add(finisher)  # kept alive until done
        finisher.add_done_callback(self._finishers.discard)


@dataclass(frozen=True)
class _Plan:
    """What every choice of one call shares."""

    request: GenerationRequest
    prompt_ids: list[int]
    feed: list[int]  # the pending token, then the prompt
    arrived: float


class _Merged:
    """The events of several streams as they come. Each stream is pumped by a task of
    its own from construction on, so each runs (and, however the call ends, saves what
    it generated) whether or not anyone reads yet. The first error ends `events`;
    `close` cancels the pumps, which closes every stream."""

    def __init__(self, streams: list[AsyncGenerator[Event, None]]) -> None:
        self._queue: asyncio.Queue[tuple[Event | None, BaseException | None]] = asyncio.Queue()
        self.started = [False] * len(streams)  # a pump cancelled before its first step never runs
        self._tasks = [
            asyncio.create_task(self._pump(index, stream)) for index, stream in enumerate(streams)
        ]

    async def _pump(self, index: int, stream: AsyncGenerator[Event, None]) -> None:
        self.started[index] = True
        try:
            async for event in stream:
                self._queue.put_nowait((event, None))
        except Exception as exc:
            self._queue.put_nowait((None, exc))
            return
        finally:
            await stream.aclose()
        self._queue.put_nowait((None, None))

    async def events(self) -> AsyncGenerator[Event, None]:
        open_streams = len(self._tasks)
        while open_streams:
            event, error = await self._queue.get()
            if error is not None:
                raise error
            if event is None:
                open_streams -= 1
            else:
                yield event

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _last_two(tokens: list[int]) -> tuple[int | None, int | None]:
    """The last two tokens, oldest first; None where there are fewer."""
    return (tokens[-2] if len(tokens) >= 2 else None, tokens[-1] if tokens else None)
