"""The model in onnxruntime: the bundle's step graph, and its step + softmax graph.

`run(tokens, h, c)` feeds `tokens` (B, T) from state (h, c) (L, B, H) and returns the
logits after the last position and the new state. Prefill and decode are the same call
with a different T.

`run_softmax` is `run` with the softmax that direct sampling needs computed in the same
onnxruntime call: the bundle's `step_softmax` graph, built at export. A bundle without
it still serves; the runner then samples with separate calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from simmer.bundle import BundleError, ModelBundle, check_graph
from simmer.ort import GraphLoadError, fast_run, open_session

logger = logging.getLogger(__name__)

_OUTPUTS = ["logits", "hn", "cn"]
_SOFTMAX_OUTPUTS = ["logits", "hn", "cn", "weights", "sums"]


@dataclass(frozen=True)
class ModelOutput:
    logits: np.ndarray  # (B, V) float32
    h: np.ndarray  # (L, B, H) float32
    c: np.ndarray  # (L, B, H) float32


@dataclass(frozen=True)
class SoftmaxOutput(ModelOutput):
    probs: np.ndarray  # (B, nb * width): softmax(logits * inv_t), zero past the vocabulary
    sums: np.ndarray  # (B, nb) block sums of the probabilities


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
        self._run_softmax: Any = None
        self._check_graph()
        self._open_softmax()

    @property
    def has_softmax(self) -> bool:
        """Whether `run_softmax` is available (the bundle ships step_softmax)."""
        return self._run_softmax is not None

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

    def _open_softmax(self) -> None:
        graph = self.bundle.graph("step_softmax")
        if graph is None:
            logger.warning("the bundle has no step_softmax graph; sampling in separate calls")
            return
        try:
            session = open_session(graph.path, self.intra_op_threads, self.providers)
        except GraphLoadError:
            logger.warning("cannot open the step_softmax graph", exc_info=True)
            return
        self._run_softmax = fast_run(session)

    def zero_state(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.num_layers, batch, self.hidden_size)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def run(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> ModelOutput:
        logits, hn, cn = self._run(_OUTPUTS, {"tokens": tokens, "h0": h, "c0": c}, None)
        return ModelOutput(logits, hn, cn)

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

    def warm_up(self, batches: tuple[int, ...] = (1, 8)) -> float:
        """Run a few steps so the first real request does not pay for allocation."""
        started = time.perf_counter()
        for batch in batches:
            tokens = np.ones((batch, 1), np.int64)
            self.run(tokens, *self.zero_state(batch))
            if self.has_softmax:
                self.run_softmax(tokens, *self.zero_state(batch), np.ones(batch, np.float32))
        return time.perf_counter() - started
