"""ModelSession.run_state: the state `run` gives, without the output layer where the
bundle ships its prefill graph; the runner feeds prompts through it."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.engine.core import build_engine
from service.engine.model import ModelOutput, ModelSession
from service.engine.params import SamplingParams
from service.engine.request import Request
from simmer.bundle import GRAPHS, MANIFEST, PREFILL, load_bundle


def _without_prefill(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "prefill.onnx").unlink()
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest[GRAPHS].pop(PREFILL)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("graph", ["prefill", "model.onnx"])
def test_run_state_gives_the_state_run_gives(tiny_bundle: Path, tmp_path: Path, graph: str) -> None:
    bundle = tiny_bundle if graph == "prefill" else _without_prefill(tiny_bundle, tmp_path)
    model = ModelSession(load_bundle(bundle), ["CPUExecutionProvider"])
    assert model.has_prefill == (graph == "prefill")
    rng = np.random.default_rng(3)
    for batch, seq in ((1, 1), (3, 9)):
        tokens = rng.integers(2, model.vocab_size, (batch, seq)).astype(np.int64)
        h = rng.standard_normal((model.num_layers, batch, model.hidden_size)).astype(np.float32)
        c = rng.standard_normal(h.shape).astype(np.float32)
        out = model.run(tokens, h, c)
        hn, cn = model.run_state(tokens, h, c)
        assert np.array_equal(hn, out.h) and np.array_equal(cn, out.c)


class StateModel(ModelSession):
    """The real model session, recording each call as (method, tokens' shape)."""

    calls: list[tuple[str, tuple[int, ...]]]

    def run(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> ModelOutput:
        if hasattr(self, "calls"):
            self.calls.append(("run", tokens.shape))
        return super().run(tokens, h, c)

    def run_state(
        self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if hasattr(self, "calls"):
            self.calls.append(("run_state", tokens.shape))
        return super().run_state(tokens, h, c)


def test_the_runner_feeds_a_prompt_through_run_state_and_samples_after_it(
    tiny_bundle: Path,
) -> None:
    model = StateModel(load_bundle(tiny_bundle), ["CPUExecutionProvider"])
    model.calls = []
    feed = [5, 6, 7, 8, 9]
    h, c = model.zero_state(1)

    async def main() -> Request:
        engine = build_engine(model, 4, fuse_sampling=False, decode_runs=False)
        engine.start()
        params = SamplingParams(temperature=0.0)
        request = Request(feed=feed, h=h[:, 0], c=c[:, 0], params=params, max_new_tokens=2)
        engine.submit(request)
        while not request.done:
            await request.event.wait()
            request.event.clear()
        await engine.close()
        return request

    request = asyncio.run(main())
    # all of the feed but its last token, state only; then two decode steps
    assert model.calls == [("run_state", (1, 4)), ("run", (1, 1)), ("run", (1, 1))]
    # greedy: the first token is the argmax after the whole feed, as model.onnx gives it
    out = model.run(np.array([feed], np.int64), h, c)
    assert request.tokens[0] == int(np.argmax(out.logits[0]))
