"""Sessions as the service opens them (`simmer.ort`), step timing, where to optimise the graph.

onnxruntime can optimise a graph when a session is created ("online"), or once here,
saving the optimised graph as the bundle's model.onnx ("offline"). Both are measured on
the export machine; offline is chosen only when its decode step is faster by more than
OFFLINE_MARGIN, because the unoptimised file stays portable across CPUs and onnxruntime
versions. Offline graphs are optimised at ORT_ENABLE_EXTENDED: ORT_ENABLE_ALL adds
layout changes for the CPU at hand. The service opens either with ORT_ENABLE_ALL.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.onnx_export import ExportError
from export.parity import random_state
from simmer import ort as ort_sessions
from training.model import LSTMConfig

SESSION_LEVEL = "ORT_ENABLE_ALL"  # what the service uses
OFFLINE_LEVEL = "ORT_ENABLE_EXTENDED"
BENCH_BATCHES = (1, 256)  # a decode step (seq = 1) for one session and for a full batch
THREADS = 1  # intra-op threads for the checks and the timing: see step_times
BENCH_ROUNDS = 5
BENCH_ROUND_S = 0.05  # time per (graph, batch) in each round
OFFLINE_MARGIN = 0.10


def open_session(model: Path | bytes, level: str = SESSION_LEVEL) -> ort.InferenceSession:
    """A session as the service opens one (`simmer.ort`), at optimisation `level`."""
    try:
        return ort_sessions.open_session(model, THREADS, level=level)
    except ort_sessions.GraphLoadError as exc:
        raise ExportError(str(exc)) from exc


def save_optimized(path: Path, out: Path) -> None:
    """The graph at `path` optimised offline (OFFLINE_LEVEL), saved at `out`."""
    try:
        ort_sessions.open_session(path, THREADS, level=OFFLINE_LEVEL, optimized_model=out)
    except ort_sessions.GraphLoadError as exc:
        raise ExportError(str(exc)) from exc


def _decode_feeds(config: LSTMConfig, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    h, c = random_state(config, batch, rng)
    return {
        "tokens": rng.integers(2, config.vocab_size, (batch, 1), dtype=np.int64),
        "h0": h,
        "c0": c,
    }


def step_times(graphs: Mapping[str, Path], config: LSTMConfig) -> dict[str, dict[str, float]]:
    """Milliseconds per decode step (seq = 1) for each graph and batch size.

    With one intra-op thread onnxruntime computes on the calling thread, so the thread's
    CPU time is the step's cost on an idle core, whatever else the machine is running.
    The graphs take turns within each round; each figure is the median of the rounds.
    """
    sessions = {name: open_session(path) for name, path in graphs.items()}
    rounds: dict[str, dict[int, list[float]]] = {
        name: {b: [] for b in BENCH_BATCHES} for name in graphs
    }
    for _ in range(BENCH_ROUNDS):
        for batch in BENCH_BATCHES:
            feeds = _decode_feeds(config, batch)
            for name, session in sessions.items():
                started = time.thread_time()
                session.run(None, feeds)  # warm-up, and a guess at how many runs fit
                once = max(time.thread_time() - started, 1e-6)
                samples = []
                for _ in range(int(min(200, max(3, BENCH_ROUND_S / once)))):
                    started = time.thread_time()
                    session.run(None, feeds)
                    samples.append(time.thread_time() - started)
                rounds[name][batch].append(statistics.median(samples) * 1e3)
    return {
        name: {str(b): statistics.median(times) for b, times in by_batch.items()}
        for name, by_batch in rounds.items()
    }


def load_ms(path: Path, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        open_session(path)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def choose_graph_optimization(
    raw: Path, config: LSTMConfig, work: Path
) -> tuple[Path, dict[str, Any]]:
    """The graph to ship (raw or offline-optimised) and the measurements behind the choice."""
    offline = work / f"{raw.stem}.optimized.onnx"
    save_optimized(raw, offline)
    candidates = {"online": raw, "offline": offline}
    steps = step_times(candidates, config)
    ratio = statistics.geometric_mean(
        steps["offline"][str(b)] / steps["online"][str(b)] for b in BENCH_BATCHES
    )
    choice = "offline" if ratio < 1 - OFFLINE_MARGIN else "online"
    record = {
        "graph_optimization": choice,
        "session_graph_optimization_level": SESSION_LEVEL,
        "offline_level": OFFLINE_LEVEL,
        "rule": f"offline only if its decode step is more than {OFFLINE_MARGIN:.0%} faster",
        "offline_vs_online_step_time": ratio,
        "threads": THREADS,
        "measured": {
            name: {"load_ms": load_ms(path), "step_ms": steps[name]}
            for name, path in candidates.items()
        },
    }
    return candidates[choice], record
