"""Every value the request schema admits works: hypothesis over the real scheduler,
sampler and generation service, on the real tiny bundle.

The parameters are drawn at the schema's own bounds and through its own validation
(`SamplingFields`), so a bound that admits a value the engine cannot handle fails here.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.engine.adjust import SlotAdjustments
from service.engine.core import EngineCore, build_engine
from service.engine.model import ModelSession
from service.engine.params import BAN, MIN_TEMPERATURE, SamplingParams, make_rng
from service.engine.runner import StepOutput
from service.engine.sampler import RowParams, sample_rows
from service.engine.scheduler import StepPlan
from service.engine.scoring import Scorer
from service.generation.events import DoneEvent, SessionEvent, TokenEvent
from service.generation.service import GenerationService
from service.generation.sessions import ModelShape
from service.metrics import Metrics
from service.protocol import MAX_INT32, MAX_LOGIT_BIAS, MAX_SEED, Limits, SamplingFields
from service.sessions import MemorySessionStore
from simmer.bundle import load_bundle

LIMITS = Limits(max_new_tokens=12, max_logprobs=1000, default_max_tokens=4)

# values at and around every bound, then anything in between
temperatures = st.one_of(
    st.sampled_from([0.0, 5e-324, 7.4e-216, 1e-30, MIN_TEMPERATURE / 2, MIN_TEMPERATURE, 100.0]),
    st.floats(0.0, 100.0, allow_subnormal=True),
)
top_ks = st.one_of(st.sampled_from([0, 1, 2, 499, 500, 501, MAX_INT32]), st.integers(0, MAX_INT32))
top_ps = st.one_of(
    st.sampled_from([5e-324, 1e-300, 0.5, 1.0 - 1e-16, 1.0]),
    st.floats(0.0, 1.0, exclude_min=True, allow_subnormal=True),
)
seeds = st.one_of(st.none(), st.sampled_from([0, 1, MAX_SEED]), st.integers(0, MAX_SEED))
logprobs = st.one_of(st.none(), st.sampled_from([0, 1, 500, 1000]), st.integers(0, 1000))
stops = st.lists(st.text(min_size=1, max_size=64), max_size=4)
TINY_VOCAB = 500  # the tiny bundle's
bias_values = st.one_of(
    st.sampled_from([BAN, -BAN, -99.999, 0.0, 5e-324, -5e-324, 1e-300]),
    st.floats(BAN, -BAN, allow_subnormal=True),
)
logit_biases = st.one_of(
    st.none(),
    st.dictionaries(st.integers(0, TINY_VOCAB - 1).map(str), bias_values, max_size=20),
    # words of the tiny vocabulary (ids and words never both: one token named twice is a 422)
    st.dictionaries(st.sampled_from(["[UNK]", "salt", "the", ",", ".", "and"]), bias_values),
    st.sampled_from(
        [
            {str(i): BAN for i in range(2, 2 + MAX_LOGIT_BIAS)},  # as many bans as allowed
            {str(i): -BAN for i in range(TINY_VOCAB - MAX_LOGIT_BIAS, TINY_VOCAB)},
            {str(i): BAN if i % 2 else -BAN for i in range(MAX_LOGIT_BIAS)},
            {"0": BAN, "1": 0.0},  # never stop; [UNK] un-banned
        ]
    ),
)
penalties = st.one_of(
    st.none(),
    st.sampled_from([-2.0, 2.0, 0.0, 5e-324, -1e-300]),
    st.floats(-2.0, 2.0, allow_subnormal=True),
)
prompts = st.one_of(
    st.sampled_from(["recipe for", "", " ", "[UNK]", "recipe for soup |"]),
    st.text(max_size=200),
)

fields = st.fixed_dictionaries(
    {
        "prompt": prompts,
        "max_tokens": st.one_of(st.none(), st.integers(1, LIMITS.max_new_tokens)),
        "temperature": temperatures,
        "top_k": top_ks,
        "top_p": top_ps,
        "seed": seeds,
        "logprobs": logprobs,
        "stop": stops,
        "ignore_eos": st.booleans(),
        "logit_bias": logit_biases,
        "presence_penalty": penalties,
        "frequency_penalty": penalties,
    }
)


class CheckingCore(EngineCore):
    """The real engine core, keeping every token id it samples."""

    sampled: list[int]

    def _step(self, plan: StepPlan) -> list[StepOutput]:
        steps = super()._step(plan)
        for step in steps:
            self.sampled.extend(step.tokens.tolist())
        return steps


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    scheduler: CheckingCore
    service: GenerationService
    vocab: int
    limits: Limits  # with the bundle's vocabulary, and the server's [UNK] ban

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module", params=["runs", "fused", "onnx_head", "numpy"])
def harness(request: pytest.FixtureRequest, tiny_bundle: Path) -> Iterator[Harness]:
    bundle = load_bundle(tiny_bundle)
    engine = ModelSession(bundle, ["CPUExecutionProvider"], intra_op_threads=1)
    loop = asyncio.new_event_loop()
    # "runs": as served (small batches in decode runs where they can); "numpy": the
    # fallback for a bundle without sampling graphs
    built = build_engine(
        engine,
        64,
        fuse_sampling=request.param in ("runs", "fused"),
        sampling_graphs=request.param != "numpy",
        decode_runs=request.param == "runs",
    )
    scheduler = CheckingCore(built.runner, 64, built.output)
    scheduler.sampled = []

    async def start() -> GenerationService:
        scheduler.start()
        return GenerationService(
            scheduler,
            MemorySessionStore(600, 10_000),
            bundle.tokenizer,
            Metrics(),
            model=ModelShape(bundle.version, engine.num_layers, engine.hidden_size),
            max_prompt_tokens=4096,
            session_ttl_s=600,
            max_waiting=64,
            scorer=Scorer.from_bundle(bundle),
        )

    service = loop.run_until_complete(start())
    limits = replace(LIMITS, tokenizer=bundle.tokenizer, ban_unk=True)
    yield Harness(loop, scheduler, service, engine.vocab_size, limits)
    loop.run_until_complete(scheduler.close())
    loop.close()


async def _generate(service: GenerationService, body: dict[str, Any], limits: Limits) -> DoneEvent:
    request = SamplingFields.model_validate(body).to_generation(limits)
    done: DoneEvent | None = None
    async for event in service.generate(request):
        if isinstance(event, TokenEvent) and event.logprobs is not None:
            for step in event.logprobs:
                assert math.isfinite(step.logprob) and step.logprob <= 1e-9
                assert 0 < len(step.top) <= min(request.sampling.logprobs, 500)
                for word in step.top:
                    assert math.isfinite(word.logprob)
        if isinstance(event, DoneEvent):
            done = event
    assert done is not None
    return done


@given(bodies=st.lists(fields, min_size=1, max_size=4), wide=st.booleans())
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_every_admitted_parameter_mix_samples_inside_the_vocabulary(
    harness: Harness, bodies: list[dict[str, Any]], wide: bool
) -> None:
    # 40 rows at once take the envelope path of the onnxruntime head
    batch = [bodies[i % len(bodies)] for i in range(40 if wide else len(bodies))]
    batch = [body if body["prompt"].strip() else {**body, "prompt": "recipe for"} for body in batch]
    harness.scheduler.sampled = []

    async def all_of_them() -> list[DoneEvent]:
        return list(
            await asyncio.gather(*(_generate(harness.service, b, harness.limits) for b in batch))
        )

    results = harness.run(all_of_them())
    assert all(done.finish_reason in ("length", "stop", "eos") for done in results)
    assert harness.scheduler.sampled, "nothing was sampled"
    assert all(0 <= token < harness.vocab for token in harness.scheduler.sampled)
    # and an ordinary request is still served
    ordinary = harness.run(
        _generate(harness.service, {"prompt": "recipe for soup"}, harness.limits)
    )
    assert ordinary.finish_reason in ("length", "eos")
    assert harness.scheduler.worker_alive


@given(
    body=fields,
    n=st.one_of(st.sampled_from([1, 2, 16]), st.integers(1, 16)),
    echo=st.booleans(),
    return_state=st.booleans(),
    score_only=st.booleans(),
)
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_choices_echo_and_state_tokens_at_any_admitted_value_are_served(
    harness: Harness,
    body: dict[str, Any],
    n: int,
    echo: bool,
    return_state: bool,
    score_only: bool,
) -> None:
    body = {**body, "prompt": body["prompt"] if body["prompt"].strip() else "recipe for"}
    body.update(echo=echo, return_state=return_state, max_tokens=min(body["max_tokens"] or 8, 8))
    if echo and score_only and n == 1:
        body["max_tokens"] = 0  # scoring only
    request = SamplingFields.model_validate(body).to_generation(harness.limits, n)

    async def events() -> tuple[list[Any], list[DoneEvent]]:
        sessions, done = [], []
        async for event in harness.service.generate(request):
            if isinstance(event, SessionEvent):
                sessions.append(event)
            elif isinstance(event, DoneEvent):
                done.append(event)
        return sessions, done

    sessions, done = harness.run(events())
    assert len(sessions) == len(done) == n
    assert len({d.session_id for d in done}) == n
    assert all(d.finish_reason in ("length", "stop", "eos") for d in done)
    if echo:
        prompt = sessions[0].prompt
        assert prompt is not None and len(prompt) == done[0].prompt_tokens
        assert all(p.logprob is None or p.logprob <= 1e-6 for p in prompt)
    for d in done:
        assert (d.state is not None) == return_state
        if d.state is not None:
            back = harness.service.sessions.unseal(d.state, "")
            assert back.n_tokens == d.session_tokens
    assert harness.scheduler.worker_alive


@given(
    params=st.lists(
        st.builds(
            SamplingParams,
            temperature=temperatures,
            top_k=top_ks,
            top_p=top_ps,
            seed=seeds,
        ),
        min_size=1,
        max_size=6,
    ),
    scale=st.sampled_from([1.0, 1e-3, 1e3, 1e6]),
)
@settings(max_examples=60, deadline=None)
def test_the_sampler_alone_returns_valid_ids_for_any_parameters_and_logit_scale(
    params: list[SamplingParams], scale: float
) -> None:
    vocab = 500
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((len(params), vocab)) * scale).astype(np.float32)
    # the scheduler caps top_k at the vocabulary; the sampler must cope without that too
    rows = RowParams.of(params)
    tokens = sample_rows(logits.copy(), rows, [make_rng(i) for i in range(len(params))])
    assert tokens.shape == (len(params),)
    assert ((tokens >= 0) & (tokens < vocab)).all()
    for row, p in enumerate(params):
        if p.greedy:
            assert tokens[row] == int(np.argmax(logits[row]))


@given(
    params=st.lists(
        st.builds(
            SamplingParams,
            temperature=temperatures,
            top_k=top_ks,
            top_p=top_ps,
            seed=seeds,
            logit_bias=st.dictionaries(st.integers(0, 499), bias_values, max_size=MAX_LOGIT_BIAS)
            .filter(lambda bias: sum(v <= BAN for v in bias.values()) < 500)
            .map(lambda bias: tuple(bias.items())),
            presence_penalty=st.floats(-2.0, 2.0),
            frequency_penalty=st.floats(-2.0, 2.0),
        ),
        min_size=1,
        max_size=6,
    ),
    scale=st.sampled_from([1.0, 1e-3, 1e3, 1e6]),
    generated=st.lists(st.integers(0, 499), max_size=50),
)
@settings(max_examples=60, deadline=None)
def test_biased_and_penalised_rows_sample_valid_ids_and_never_a_banned_one(
    params: list[SamplingParams], scale: float, generated: list[int]
) -> None:
    vocab = 500
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((len(params), vocab)) * scale).astype(np.float32)
    adjust = SlotAdjustments(len(params), vocab)
    for slot, p in enumerate(params):
        adjust.load(slot, p)
    batch = adjust.batch(np.arange(len(params)), np.array([p.seed is not None for p in params]))
    if batch is not None:
        for token in generated:
            batch.count(np.full(len(params), token))
        batch.apply(logits)
    assert not np.isnan(logits).any()
    rows = RowParams.of(params)
    tokens = sample_rows(logits.copy(), rows, [make_rng(i) for i in range(len(params))])
    assert ((tokens >= 0) & (tokens < vocab)).all()
    for row, p in enumerate(params):
        assert int(tokens[row]) not in p.bans
        if p.greedy:
            assert tokens[row] == int(np.argmax(logits[row]))
