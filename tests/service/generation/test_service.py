"""In-process: continuing a session feeds only the new tokens, never the history."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import numpy as np

from service.engine.core import EngineCore, build_engine
from service.engine.model import ModelOutput, ModelSession, SoftmaxOutput
from service.engine.params import SamplingParams, seeded_for
from service.generation.events import DoneEvent, SessionEvent, TokenEvent
from service.generation.service import GenerationService
from service.generation.sessions import ModelShape
from service.metrics import Metrics
from service.protocol import GenerationRequest
from service.sessions import MemorySessionStore, SessionState
from simmer.bundle import ModelBundle, load_bundle


class RecordingModel(ModelSession):
    fed: list[tuple[int, ...]]

    def run(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> ModelOutput:
        if hasattr(self, "fed"):
            self.fed.extend(tuple(row) for row in tokens.tolist())
        return super().run(tokens, h, c)

    def run_state(
        self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if hasattr(self, "fed"):
            self.fed.extend(tuple(row) for row in tokens.tolist())
        return super().run_state(tokens, h, c)

    def run_softmax(
        self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray, inv_t: np.ndarray
    ) -> SoftmaxOutput:
        if hasattr(self, "fed"):
            self.fed.extend(tuple(row) for row in tokens.tolist())
        return super().run_softmax(tokens, h, c, inv_t)


def _service(
    scheduler: EngineCore, store: MemorySessionStore, bundle: ModelBundle
) -> GenerationService:
    """A generation service over `scheduler` and `store`, as the app builds one."""
    return GenerationService(
        scheduler,
        store,
        bundle.tokenizer,
        Metrics(),
        model=ModelShape(bundle.version, bundle.num_layers, bundle.hidden_size),
        max_prompt_tokens=4096,
        session_ttl_s=60,
        max_waiting=scheduler.max_batch,
    )


def test_continuing_feeds_only_the_pending_token_and_the_new_prompt(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    engine = RecordingModel(bundle, ["CPUExecutionProvider"])
    engine.fed = []
    tokenizer = bundle.tokenizer

    async def main() -> list[list[int]]:
        scheduler = build_engine(engine, 8)
        scheduler.start()
        service = _service(scheduler, MemorySessionStore(60, 10), bundle)
        greedy = SamplingParams(temperature=0.0)
        long_prompt = " ".join(["recipe for", *tokenizer.vocab[2:200]])
        calls = []
        session_id = None
        for prompt in (long_prompt, "", "stir well"):
            before = len(engine.fed)
            request = GenerationRequest(prompt, session_id, max_tokens=5, sampling=greedy)
            async for event in service.generate(request):
                if isinstance(event, SessionEvent):
                    session_id = event.session_id
                assert isinstance(event, SessionEvent | TokenEvent | DoneEvent)
            calls.append([len(row) for row in engine.fed[before:]])
        await scheduler.close()
        return calls

    first, second, third = asyncio.run(main())
    # a prompt is fed once: all but its last token in one call, the last with the first step
    long_prompt = tokenizer.encode(" ".join(["recipe for", *tokenizer.vocab[2:200]]))
    assert first[0] == len(long_prompt) - 1 and all(n == 1 for n in first[1:])
    # continuing: the pending token alone, then one token per step
    assert second and all(n == 1 for n in second)
    # a new prompt: the pending token and its 2 words, never the 200-word history
    assert third[0] == 1 + 2 - 1 and all(n == 1 for n in third[1:])
    assert len(third) == 1 + 5


def test_a_seed_is_mixed_with_the_session_length() -> None:
    params = SamplingParams(seed=5)
    assert seeded_for(params, 0) == params  # a new session uses the seed as given
    assert seeded_for(params, 12) == seeded_for(params, 12)  # same state, same draws
    assert seeded_for(params, 12).seed != seeded_for(params, 13).seed  # continuing moves on
    assert seeded_for(SamplingParams(), 12).seed is None


class SlowStore(MemorySessionStore):
    """A memory store whose writes take a while, like a network round trip."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(60, 10)
        self.delay_s = delay_s
        self.writing = asyncio.Event()

    async def put(self, session_id: str, state: SessionState) -> None:
        self.writing.set()
        await asyncio.sleep(self.delay_s)
        await super().put(session_id, state)


def test_a_consumer_cancelled_while_its_session_is_written_loses_nothing(
    tiny_bundle: Path,
) -> None:
    bundle = load_bundle(tiny_bundle)
    engine = ModelSession(bundle, ["CPUExecutionProvider"])

    async def main() -> tuple[bool, SessionState | None, int]:
        scheduler = build_engine(engine, 4)
        scheduler.start()
        store = SlowStore(0.3)
        service = _service(scheduler, store, bundle)
        request = GenerationRequest(
            "recipe for", None, max_tokens=6, sampling=SamplingParams(top_k=1, ignore_eos=True)
        )
        session_ids: list[str] = []

        async def consume() -> None:
            async for event in service.generate(request):
                if isinstance(event, SessionEvent):
                    session_ids.append(event.session_id)

        consumer = asyncio.create_task(consume())
        await store.writing.wait()  # every token is out; the session is being written
        consumer.cancel()  # the client leaves (a cancelled WebSocket or SSE task)
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        session_id = session_ids[0]
        locked_during_write = not await store.lock(session_id)
        await asyncio.wait_for(service.admission._idle.wait(), 5)  # the write is over
        relocked = await store.lock(session_id)  # and the lock was given back after it
        state = await store.get(session_id)
        await scheduler.close()
        return locked_during_write and relocked, state, len(bundle.tokenizer.encode("recipe for"))

    locks_ok, state, prompt_tokens = asyncio.run(main())
    assert locks_ok  # nobody could continue from the state before the write
    assert state is not None  # the write was not cut short
    assert state.n_tokens == prompt_tokens + 6


def test_a_slow_consumer_still_receives_every_token_and_all_the_text(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    engine = ModelSession(bundle, ["CPUExecutionProvider"])
    greedy = SamplingParams(top_k=1, ignore_eos=True)

    async def run(delay_s: float) -> list[tuple[str, int, int]]:
        scheduler = build_engine(engine, 4)
        scheduler.start()
        service = _service(scheduler, MemorySessionStore(60, 10), bundle)
        calls = []
        for prompt in ("recipe for soup |", "recipe for bread |", "recipe for tea |"):
            text, streamed, done_count = "", 0, -1
            request = GenerationRequest(prompt, None, max_tokens=16, sampling=greedy)
            async for event in service.generate(request):
                if isinstance(event, TokenEvent):
                    text += event.text
                    streamed += event.count
                    await asyncio.sleep(delay_s)  # a socket write that takes a while
                elif isinstance(event, DoneEvent):
                    done_count = event.completion_tokens
            calls.append((text, streamed, done_count))
        await scheduler.close()
        return calls

    fast, slow = asyncio.run(run(0.0)), asyncio.run(run(0.01))
    assert slow == fast
    assert all(streamed == done == 16 for _, streamed, done in slow)


def test_n_choices_feed_the_prompt_once_then_one_token_each_in_one_batch(
    tiny_bundle: Path,
) -> None:
    bundle = load_bundle(tiny_bundle)
    engine = RecordingModel(bundle, ["CPUExecutionProvider"])
    engine.fed = []
    prompt = "recipe for soup | add the water and the salt"

    async def main() -> list[DoneEvent]:
        scheduler = build_engine(engine, 8)
        scheduler.start()
        service = _service(scheduler, MemorySessionStore(60, 10), bundle)
        sampling = SamplingParams(seed=1, ignore_eos=True)
        request = GenerationRequest(prompt, None, max_tokens=3, sampling=sampling, n=4)
        done = [e async for e in service.generate(request) if isinstance(e, DoneEvent)]
        await scheduler.close()
        return done

    done = asyncio.run(main())
    length = len(bundle.tokenizer.encode(prompt))
    # the prefill's rows (a state-only call, then its one step), then 4 rows in each of
    # 3 steps: all but the last prompt token, once
    assert len(engine.fed) == 2 + 3 * 4
    assert len(engine.fed[0]) == length - 2 and len(engine.fed[1]) == 1
    assert all(len(row) == 1 for row in engine.fed[2:])
    assert sorted(d.choice for d in done if d.choice is not None) == [0, 1, 2, 3]
    assert [d.fed_tokens for d in sorted(done, key=lambda d: d.choice or 0)] == [length, 1, 1, 1]


def test_a_client_that_leaves_n_choices_at_their_announcement_frees_and_saves_them(
    tiny_bundle: Path,
) -> None:
    bundle = load_bundle(tiny_bundle)
    engine = ModelSession(bundle, ["CPUExecutionProvider"])

    async def main() -> tuple[int, list[SessionState | None], list[str]]:
        scheduler = build_engine(engine, 8)
        scheduler.start()
        store = MemorySessionStore(60, 10)
        service = _service(scheduler, store, bundle)
        sampling = SamplingParams(ignore_eos=True)
        request = GenerationRequest("recipe for", None, max_tokens=10_000, sampling=sampling, n=3)
        events = service.generate(request)
        announced = []
        async for event in events:
            assert isinstance(event, SessionEvent)
            announced.append(event.session_id)
            if len(announced) == 2:
                break  # gone before the third announcement and any token
        await events.aclose()
        await asyncio.wait_for(service.admission._idle.wait(), 10)  # all three freed
        await service.wait_finishers(10)
        states = [await store.get(i) for i in announced]
        held = service.held_sessions()
        await scheduler.close()
        return service.admission.active, states, held

    active, states, held = asyncio.run(main())
    assert active == 0 and held == []
    # each announced session was saved: with what its call generated, or, for a call
    # stopped before its first step, as it was before the call
    assert all(state is not None for state in states)
