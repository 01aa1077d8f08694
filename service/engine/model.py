"""The model in onnxruntime: the bundle's step graph, and its step + softmax graph.

`run(tokens, h, c)` feeds `tokens` (B, T) from state (h, c) (L, B, H) and returns the
logits after the last position and the new state. Prefill and decode are the same call
with a different T.

`run_softmax` is `run` with the softmax that direct sampling needs computed in the same
onnxruntime call: the bundle's `step_softmax` graph, built at export. A bundle without
it still serves; the runner then samples with separate calls.

`run_state` is `run` without the logits: the bundle's `prefill` graph, which leaves out
the output layer, for a prompt whose logits nobody reads; model.onnx where the bundle
has no such graph.

`run_decode` takes `run_steps` decode steps in one call, each sampled in the graph and
fed to the next: the bundle's `decode_run` graph (see `simmer.bundle`). A bundle
without it serves one step per call (`run_steps` is 0).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from simmer.bundle import (
    DECODE_RUN,
    PREFILL,
    STEP_SOFTMAX,
    BundleError,
    ModelBundle,
    check_graph,
)
from simmer.ort import GraphLoadError, fast_run, open_session

logger = logging.getLogger(__name__)

_OUTPUTS = ["logits", "hn", "cn"]
_STATE_OUTPUTS = ["hn", "cn"]
_SOFTMAX_OUTPUTS = ["logits", "hn", "cn", "weights", "sums"]
_RUN_OUTPUTS = ["sampled", "hs", "cs"]


@dataclass(frozen=True)
class ModelOutput:
    logits: np.ndarray  # (B, V) float32
    h: np.ndarray  # (L, B, H) float32
    c: np.ndarray  # (L, B, H) float32


@dataclass(frozen=True)
class SoftmaxOutput(ModelOutput):
    probs: np.ndarray  # (B, nb * width): softmax(logits * inv_t), zero past the vocabulary
    sums: np.ndarray  # (B, nb) block sums of the probabilities


@dataclass(frozen=True)
class RunOutput:
    tokens: np.ndarray  # (B, K) int64: each row's token at each of the K steps
    h: np.ndarray  # (K, L, B, H) float32: the state after each step
    c: np.ndarray


class ModelSession:
    def __init__(
        self, bundle: ModelBundle, providers: Sequence[str], intra_op_threads: int = 0
    ) -> None:
        available = ort.get_available_providers()
        chosen = [p for p in providers if p in available]
        if not chosen:
            raise BundleError(f"none of the providers {providers} is available (have {available})")
        try:
            self.session = open_session(bundle.model_path, intra_op_threads, chosen)
        except GraphLoadError as exc:
            raise BundleError(str(exc)) from exc
        self.bundle = bundle
        self.providers = chosen
        self.provider = self.session.get_providers()[0]
        self.intra_op_threads = intra_op_threads
        self.num_layers = bundle.num_layers
        self.hidden_size = bundle.hidden_size
        self.vocab_size = bundle.vocab_size
        self._run = fast_run(self.session)
        self._check_graph()
        self._run_softmax = self._open(STEP_SOFTMAX, "sampling in separate calls")
        self._run_prefill = self._open(PREFILL, "prompts are fed through the whole model")
        self._run_decode = self._open(DECODE_RUN, "one decode step per call")
        run = self.bundle.graph(DECODE_RUN)
        # steps per run_decode call; 0 without the graph
        self.run_steps = int(run.params["steps"]) if self._run_decode and run else 0

    @property
    def has_softmax(self) -> bool:
        """Whether `run_softmax` is available (the bundle ships step_softmax)."""
        return self._run_softmax is not None

    @property
    def has_prefill(self) -> bool:
        """Whether `run_state` skips the output layer (the bundle ships prefill)."""
        return self._run_prefill is not None

    def _check_graph(self) -> None:
        """The bundle's graph contract (the same check as load_bundle), then a dry run."""
        shapes = {
            arg.name: tuple(arg.shape)
            for arg in [*self.session.get_inputs(), *self.session.get_outputs()]
        }
        check_graph(shapes, self.vocab_size, self.hidden_size, self.num_layers)
        # a dry run catches graphs whose shapes only fail at run time
        out = self.run(np.ones((1, 1), np.int64), *self.zero_state(1))
        if out.logits.shape != (1, self.vocab_size):
            raise BundleError(
                f"vocabulary size disagrees: graph gives {out.logits.shape[-1]} logits, "
                f"tokenizer has {self.vocab_size} words"
            )

    def _open(self, name: str, otherwise: str) -> Any:
        """A fast run function over the bundle's graph `name`; None, with a warning that
        says what the service does `otherwise`, where it has none or it cannot open."""
        graph = self.bundle.graph(name)
        if graph is None:
            logger.warning("the bundle has no %s graph; %s", name, otherwise)
            return None
        try:
            session = open_session(graph.path, self.intra_op_threads, self.providers)
        except GraphLoadError:
            logger.warning("cannot open the %s graph; %s", name, otherwise, exc_info=True)
            return None
        return fast_run(session)

    def zero_state(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.num_layers, batch, self.hidden_size)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def run(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> ModelOutput:
        logits, hn, cn = self._run(_OUTPUTS, {"tokens": tokens, "h0": h, "c0": c}, None)
        return ModelOutput(logits, hn, cn)

    def run_state(
        self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The state (h, c) after feeding `tokens` (B, T) from (h, c), as `run` gives it,
        without computing the logits where the bundle has its prefill graph."""
        if self._run_prefill is None:
            out = self.run(tokens, h, c)
            return out.h, out.c
        hn, cn = self._run_prefill(_STATE_OUTPUTS, {"tokens": tokens, "h0": h, "c0": c}, None)
        return hn, cn

    def run_softmax(
        self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray, inv_t: np.ndarray
    ) -> SoftmaxOutput:
        """`run`, plus softmax(logits * inv_t) weights and block sums for direct sampling,
        in the same onnxruntime call. Needs `has_softmax`."""
        if self._run_softmax is None:
            raise RuntimeError("the bundle has no step_softmax graph")
        feeds = {"tokens": tokens, "h0": h, "c0": c, "inv_t": inv_t.reshape(-1, 1)}
        logits, hn, cn, probs, sums = self._run_softmax(_SOFTMAX_OUTPUTS, feeds, None)
        return SoftmaxOutput(logits, hn, cn, probs, sums)

    def run_decode(
        self,
        tokens: np.ndarray,
        h: np.ndarray,
        c: np.ndarray,
        inv_t: np.ndarray,
        ban: np.ndarray,
        uniforms: np.ndarray,
    ) -> RunOutput:
        """`run_steps` decode steps from `tokens` (B, T) and state (h, c), each drawn from
        softmax(logits * inv_t) (B,) without the row's `ban` (B,) (-1: none) with
        `uniforms` (B, run_steps) float64 in [0, 1). Needs `run_steps`."""
        if self._run_decode is None:
            raise RuntimeError("the bundle has no decode_run graph")
        feeds = {
            "tokens": tokens,
            "h0": h,
            "c0": c,
            "inv_t": inv_t.reshape(-1, 1),
            "ban": ban.reshape(-1, 1),
            "uniforms": uniforms,
        }
        sampled, hs, cs = self._run_decode(_RUN_OUTPUTS, feeds, None)
        return RunOutput(sampled, hs, cs)

    def warm_up(self, batches: tuple[int, ...] = (1, 8)) -> float:
        """Run a few steps so the first real request does not pay for allocation."""
        started = time.perf_counter()
        for batch in batches:
            tokens = np.ones((batch, 1), np.int64)
            self.run(tokens, *self.zero_state(batch))
            if self.has_prefill:  # else run_state is the run above
                self.run_state(tokens, *self.zero_state(batch))
            ones = np.ones(batch, np.float32)
            if self.has_softmax:
                self.run_softmax(tokens, *self.zero_state(batch), ones)
            if self.run_steps:
                no_ban, uniforms = np.full(batch, -1, np.int64), np.zeros((batch, self.run_steps))
                self.run_decode(tokens, *self.zero_state(batch), ones, no_ban, uniforms)
        return time.perf_counter() - started
