"""Decode runs: a small unseeded batch takes several steps per onnxruntime call, and
each request ends exactly as single steps would have ended it.

A run starts only when every row can sample at least half the run before its token
limit; a row that reaches its limit or draws the stop token part-way ends there and
the batch goes on from that step, so limits hold and every session's state is its
prompt and kept tokens replayed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from service.engine.core import EngineCore, build_engine
from service.engine.model import ModelOutput, ModelSession, RunOutput, SoftmaxOutput
from service.engine.params import BAN, SamplingParams
from service.engine.request import Request
from service.engine.runner import ModelRunner, StepOutput
from simmer.bundle import load_bundle
from simmer.tokenizer import PAD_ID, UNK_ID


class RecordingModel(ModelSession):
    """The real model session, recording each call as ("step" | "run", rows); its next
    `failures` runs raise, as a failing onnxruntime call would."""

    calls: list[tuple[str, int]]
    failures = 0

    def run_softmax(
        self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray, inv_t: np.ndarray
    ) -> SoftmaxOutput:
        self.calls.append(("step", len(tokens)))
        return super().run_softmax(tokens, h, c, inv_t)

    def run(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> ModelOutput:
        if hasattr(self, "calls") and tokens.shape[1] == 1:
            self.calls.append(("step", len(tokens)))
        return super().run(tokens, h, c)

    def run_decode(
        self,
        tokens: np.ndarray,
        h: np.ndarray,
        c: np.ndarray,
        inv_t: np.ndarray,
        ban: np.ndarray,
        uniforms: np.ndarray,
    ) -> RunOutput:
        if hasattr(self, "calls"):
            self.calls.append(("run", len(tokens)))
        if self.failures:
            self.failures -= 1
            raise RuntimeError("injected run failure")
        return super().run_decode(tokens, h, c, inv_t, ban, uniforms)


@pytest.fixture
def model(tiny_bundle: Path) -> RecordingModel:
    session = RecordingModel(load_bundle(tiny_bundle), ["CPUExecutionProvider"])
    session.calls = []
    assert session.run_steps >= 2, "the tiny bundle ships decode_run"
    return session


def request(
    model: ModelSession, feed: list[int], max_new: int, params: SamplingParams | None = None
) -> Request:
    h, c = model.zero_state(1)
    params = params or SamplingParams(temperature=1.0, logit_bias=((UNK_ID, BAN),))
    return Request(feed=feed, h=h[:, 0], c=c[:, 0], params=params, max_new_tokens=max_new)


def generate(model: ModelSession, requests: list[Request], decode_runs: bool = True) -> None:
    async def main() -> None:
        core: EngineCore = build_engine(model, 8, decode_runs=decode_runs)
        for r in requests:  # before the worker starts: it takes them all at once
            core.submit(r)
        core.start()
        for r in requests:
            while not r.done:
                await r.event.wait()
                r.event.clear()
        await core.close()

    asyncio.run(main())


def replayed(model: ModelSession, r: Request, prompt: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The state after feeding `prompt` and every kept token but the pending one."""
    fed = prompt + (r.tokens if r.finish_reason == "eos" else r.tokens[:-1])
    h, c = model.zero_state(1)
    out = model.run(np.array([fed], np.int64), h, c)
    return out.h[:, 0], out.c[:, 0]


def test_a_small_unseeded_batch_takes_its_steps_in_runs(model: RecordingModel) -> None:
    steps = model.run_steps
    requests = [request(model, [3 + i, 4], max_new=1 + 3 * steps) for i in range(3)]
    generate(model, requests)
    runs = [call for call in model.calls if call[0] == "run"]
    assert runs, model.calls
    assert all(rows <= 3 for _, rows in runs)
    tokens = sum(len(r.tokens) for r in requests)
    assert len(model.calls) < tokens  # fewer calls than tokens: several per call
    for r in requests:
        assert r.finish_reason in ("eos", "length")
        assert UNK_ID not in r.tokens  # the ban holds inside the graph
        assert PAD_ID not in r.tokens


def generate_to_limit(model: RecordingModel, limit: int) -> Request:
    """One generation of `limit` tokens that reached its limit without the stop token."""
    for _attempt in range(20):
        model.calls = []
        r = request(model, [5, 6, 7], max_new=limit)  # prefill (1, 2): not a step
        generate(model, [r])
        if r.finish_reason == "length":
            return r
    raise AssertionError("20 generations in a row stopped early")


@pytest.mark.parametrize("tail", ["half a run", "less than half"])
def test_a_run_never_passes_a_token_limit(model: RecordingModel, tail: str) -> None:
    """One step for the first token, a run, then for the rest: a run cut at the limit
    where it keeps at least half its steps, else single steps."""
    steps = model.run_steps
    rest = steps // 2 if tail == "half a run" else steps // 2 - 1
    r = generate_to_limit(model, 1 + steps + rest)
    assert len(r.tokens) == 1 + steps + rest
    tail_calls = [("run", 1)] if tail == "half a run" else [("step", 1)] * rest
    assert model.calls == [("step", 1), ("run", 1), *tail_calls]
    h, c = replayed(model, r, [5, 6, 7])
    np.testing.assert_allclose(r.h, h, atol=1e-5)  # the state of the kept tokens
    np.testing.assert_allclose(r.c, c, atol=1e-5)


def test_each_session_ends_as_its_prompt_and_kept_tokens_replayed(
    model: RecordingModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Long, hot generations, so stop tokens fall inside runs; every row's final state
    and pending token are what feeding its text from the start gives, whoever stopped
    when."""
    kept: list[StepOutput] = []  # the steps a run was cut at
    keep = ModelRunner.keep

    def recording_keep(self: ModelRunner, step: StepOutput) -> None:
        kept.append(step)
        keep(self, step)

    monkeypatch.setattr(ModelRunner, "keep", recording_keep)
    hot = SamplingParams(temperature=5.0, logit_bias=((UNK_ID, BAN),))
    prompts = [[3 + i, 7, 9] for i in range(7)]
    for _attempt in range(5):  # until a stop token falls inside a run
        model.calls = []
        requests = [request(model, list(p), max_new=300, params=hot) for p in prompts]
        generate(model, requests)
        if kept:
            break
    assert kept, "no stop token fell inside a run"
    assert any(r.finish_reason == "eos" for r in requests)
    for r, prompt in zip(requests, prompts, strict=True):
        h, c = replayed(model, r, prompt)
        np.testing.assert_allclose(r.h, h, atol=1e-5)
        np.testing.assert_allclose(r.c, c, atol=1e-5)
        assert r.feed == ([] if r.finish_reason == "eos" else [r.tokens[-1]])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, seed=7),
        SamplingParams(temperature=1.0, logprobs=2),
        SamplingParams(temperature=1.0, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, presence_penalty=0.5),
        SamplingParams(temperature=1.0, logit_bias=((UNK_ID, BAN), (9, BAN))),
        SamplingParams(temperature=1.0, logit_bias=((9, 2.0),)),
    ],
    ids=["seed", "logprobs", "ignore_eos", "top_k", "greedy", "penalty", "two_bans", "bias"],
)
def test_a_batch_a_run_cannot_serve_takes_single_steps(
    model: RecordingModel, params: SamplingParams
) -> None:
    """One such row in the batch is enough: while both run, the batch steps one token
    per call (once the other has ended, the plain one may run alone). Two plain rows,
    the control, do run together."""
    for _attempt in range(20):  # until neither row stops within its first 9 tokens
        model.calls = []
        plain = request(model, [3, 4, 5], max_new=20)
        other = request(model, [6, 7, 8], max_new=20, params=params)
        generate(model, [plain, other])
        if min(len(plain.tokens), len(other.tokens)) > 9:
            break
    assert min(len(plain.tokens), len(other.tokens)) > 9, "every try stopped early"
    assert ("run", 2) not in model.calls, model.calls
    assert model.calls.count(("step", 2)) >= 9


def test_two_plain_rows_run_together(model: RecordingModel) -> None:
    for _attempt in range(20):
        model.calls = []
        pair = [request(model, [3, 4, 5], max_new=20), request(model, [6, 7, 8], max_new=20)]
        generate(model, pair)
        if ("run", 2) in model.calls:
            break
    assert ("run", 2) in model.calls, model.calls


def test_runs_can_be_turned_off(model: RecordingModel) -> None:
    generate(model, [request(model, [3, 4, 5], max_new=30)], decode_runs=False)
    assert all(kind == "step" for kind, _ in model.calls)


def test_a_seeded_request_gets_the_same_tokens_beside_a_batch_in_runs(
    model: RecordingModel,
) -> None:
    seeded = SamplingParams(temperature=1.0, seed=11)
    alone = request(model, [3, 4], max_new=24, params=seeded)
    generate(model, [alone])
    beside = request(model, [3, 4], max_new=24, params=seeded)
    others = [request(model, [5 + i], max_new=24) for i in range(3)]
    generate(model, [*others, beside])
    assert beside.tokens == alone.tokens


def test_a_stop_string_or_a_cancel_inside_a_run_keeps_exactly_the_tokens_kept(
    model: RecordingModel,
) -> None:
    """The loop ends rows while the worker runs ahead: one by a stop check a few tokens
    in, one cancelled from its consumer; each session is its prompt and kept tokens
    replayed, and the other rows go on to their limit or the stop token."""
    steps = model.run_steps
    prompts = [[3 + i, 7, 9] for i in range(5)]

    async def main() -> list[Request]:
        core = build_engine(model, 8)
        rows = [request(model, list(p), max_new=4 * steps) for p in prompts]
        rows[0].check = lambda token: "stop" if len(rows[0].tokens) == 3 else None
        for r in rows:
            core.submit(r)
        core.start()
        cancelled = rows[1]
        while len(cancelled.tokens) < 2 and not cancelled.done:
            await cancelled.event.wait()
            cancelled.event.clear()
        core.cancel(cancelled)
        for r in rows:
            while not r.done:
                await r.event.wait()
                r.event.clear()
        await core.close()
        return rows

    for _attempt in range(10):  # until neither ended row drew the stop token first
        model.calls = []
        rows = asyncio.run(main())
        for r, prompt in zip(rows, prompts, strict=True):
            h, c = replayed(model, r, prompt)
            np.testing.assert_allclose(r.h, h, atol=1e-5)
            np.testing.assert_allclose(r.c, c, atol=1e-5)
        for r in rows[2:]:
            assert r.finish_reason in ("eos", "length")
            assert len(r.tokens) <= 4 * steps
        if (rows[0].finish_reason, rows[1].finish_reason) == ("stop", "cancelled"):
            break
    assert (rows[0].finish_reason, rows[1].finish_reason) == ("stop", "cancelled")
    assert len(rows[0].tokens) == 3
    assert any(kind == "run" and n >= 3 for kind, n in model.calls), model.calls


def test_a_failed_run_ends_its_rows_with_error_and_the_engine_goes_on(
    model: RecordingModel,
) -> None:
    model.failures = 1
    first = [request(model, [3, 4, 5], max_new=30) for _ in range(2)]
    generate(model, first)
    assert model.failures == 0
    # every row the run held ends with "error" (one may have drawn the stop token first)
    reasons = [r.finish_reason for r in first]
    assert "error" in reasons and set(reasons) <= {"error", "eos"}
    after = request(model, [3, 4, 5], max_new=30)
    generate(model, [after])
    assert after.finish_reason in ("eos", "length")
    assert ("run", 1) in model.calls or after.finish_reason == "eos"
