"""Opening onnxruntime sessions: the one place that does, for export and service alike.

Every session runs sequentially with threads that never spin (see `session_options`);
export passes the optimisation level it measures with, the service the default. This
module needs onnxruntime and numpy only: no torch, no onnx.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

DEFAULT_LEVEL = "ORT_ENABLE_ALL"  # a member name of ort.GraphOptimizationLevel

# session.run(output_names, feeds, run_options) -> one array per output name
RunFn = Callable[[list[str], Mapping[str, np.ndarray], Any], list[np.ndarray]]


class GraphLoadError(ValueError):
    """onnxruntime cannot load a graph; the message is one line."""


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


def open_session(
    model: Path | bytes,
    intra_op_threads: int = 1,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    level: str = DEFAULT_LEVEL,
    optimized_model: Path | None = None,
) -> ort.InferenceSession:
    """A session over `model` (a file, or a serialized ModelProto) with `session_options`
    at graph optimisation `level`; `optimized_model`, when given, is where onnxruntime
    saves the graph as optimised. GraphLoadError with one line if it cannot be loaded."""
    options = session_options(intra_op_threads)
    try:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    except AttributeError as exc:
        raise GraphLoadError(f"unknown graph optimisation level {level!r}") from exc
    if optimized_model is not None:
        options.optimized_model_filepath = str(optimized_model)
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types
        what = "graph" if isinstance(model, bytes) else str(model)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GraphLoadError(f"onnxruntime cannot load {what}: {reason}") from exc


def fast_run(session: ort.InferenceSession) -> RunFn:
    """`session.run` without the Python wrapper's per-call checks of the feed.

    Every feed passed to it must be a complete dict of numpy arrays, built by the caller
    itself, and `output_names` a list (not None); onnxruntime's C++ side still checks
    names, types and shapes. The wrapper's checks cost ~17 us per call, a tenth of a
    batch-1 decode step. Falls back to the public `run` where the binding is not where
    onnxruntime 1.2x/1.3x keeps it.
    """
    inner = getattr(session, "_sess", None)
    run = getattr(inner, "run", None)
    chosen: RunFn = run if callable(run) else session.run
    return chosen
