"""The engine: one onnxruntime session over a model bundle.

`run(tokens, h, c)` feeds `tokens` [batch, seq] from state (h, c) [layers, batch,
hidden] and returns the logits after the last position and the new state. Prefill
and decode are the same call with a different `seq`.

`run_weighted` is `run` with the softmax that direct sampling needs computed in the
same onnxruntime call (the model's graph with a few nodes added), which spares a small
batch a second call per step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from simmer.bundle import BundleError, ModelBundle, check_graph

logger = logging.getLogger(__name__)


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    """Options for every session the service runs: sequential, and no spinning threads.

    With one intra-op thread onnxruntime computes on the calling thread. With more, its
    pool threads would otherwise spin between the small calls of a decode loop and burn
    CPU for nothing.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


_OUTPUTS = ["logits", "hn", "cn"]
_WEIGHTED_OUTPUTS = ["logits", "hn", "cn", "weights", "sums"]


def _direct_run(session: ort.InferenceSession) -> Any:
    """`session.run` without the Python wrapper's per-call checks of the feed.

    Every feed here is a complete dict of numpy arrays the engine built itself, and
    onnxruntime's C++ side still checks names, types and shapes. The wrapper's checks
    cost ~17 us per call, a tenth of a batch-1 decode step. Falls back to the public
    `run` where the binding is not where onnxruntime 1.2x/1.3x keeps it.
    """
    inner = getattr(session, "_sess", None)
    run = getattr(inner, "run", None)
    return run if callable(run) else session.run


@dataclass(frozen=True)
class StepOutput:
    logits: np.ndarray  # (B, V) float32
    h: np.ndarray  # (L, B, H) float32
    c: np.ndarray  # (L, B, H) float32


@dataclass(frozen=True)
class WeightedStep(StepOutput):
    weights: np.ndarray  # (B, nb * width) softmax(logits * inv_t), see sampling.direct_extension
    sums: np.ndarray  # (B, nb) block sums of the weights


class Engine:
    def __init__(
        self, bundle: ModelBundle, providers: list[str], intra_op_threads: int = 0
    ) -> None:
        available = ort.get_available_providers()
        chosen = [p for p in providers if p in available]
        if not chosen:
            raise BundleError(f"none of the providers {providers} is available (have {available})")
        try:
            self.model = bundle.model_path.read_bytes()
            self.session = ort.InferenceSession(
                self.model, session_options(intra_op_threads), providers=chosen
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"onnxruntime cannot load {bundle.model_path}: {exc}") from exc
        self.bundle = bundle
        self.providers = chosen
        self.provider = self.session.get_providers()[0]
        self._weighted: ort.InferenceSession | None = None
        self._run = _direct_run(self.session)
        self._run_weighted: Any = None
        self.intra_op_threads = intra_op_threads
        self.num_layers = bundle.num_layers
        self.hidden_size = bundle.hidden_size
        self.vocab_size = bundle.vocab_size
        self._check_graph()

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

    def zero_state(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.num_layers, batch, self.hidden_size)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def run(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> StepOutput:
        logits, hn, cn = self._run(_OUTPUTS, {"tokens": tokens, "h0": h, "c0": c}, None)
        return StepOutput(logits, hn, cn)

    def enable_weights(self) -> bool:
        """Build the session `run_weighted` uses: the model's graph with sampling's
        `direct_extension` added. False (and `run_weighted` unusable) where it fails."""
        if self._weighted is None:
            from service import onnx_writer
            from service.sampling import block_width, direct_extension

            extension = direct_extension(self.vocab_size, block_width(self.vocab_size))
            try:
                self._weighted = ort.InferenceSession(
                    onnx_writer.extend(self.model, extension),
                    session_options(self.intra_op_threads),
                    providers=self.providers,
                )
            except Exception:  # e.g. a graph older than opset 13; plain `run` still works
                logger.warning("cannot fuse sampling into the model graph", exc_info=True)
                return False
            self._run_weighted = _direct_run(self._weighted)
        return True

    def run_weighted(
        self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray, inv_t: np.ndarray
    ) -> WeightedStep:
        """`run`, plus softmax(logits * inv_t) weights and block sums for direct sampling,
        in the same onnxruntime call. Needs `enable_weights()` first."""
        if self._run_weighted is None:
            raise RuntimeError("call enable_weights() first")
        feeds = {"tokens": tokens, "h0": h, "c0": c, "inv_t": inv_t.reshape(-1, 1)}
        logits, hn, cn, weights, sums = self._run_weighted(_WEIGHTED_OUTPUTS, feeds, None)
        return WeightedStep(logits, hn, cn, weights, sums)

    def warm_up(self, batches: tuple[int, ...] = (1, 8)) -> float:
        """Run a few steps so the first real request does not pay for allocation."""
        started = time.perf_counter()
        for batch in batches:
            self.run(np.ones((batch, 1), np.int64), *self.zero_state(batch))
            if self._weighted is not None:
                inv_t = np.ones(batch, np.float32)
                self.run_weighted(np.ones((batch, 1), np.int64), *self.zero_state(batch), inv_t)
        return time.perf_counter() - started
