"""The raw engine and the book-style baseline, measured in this process.

Raw engine: `ModelSession.run` over batches of one decode step each, as the scheduler calls
it, with no sampling, no scheduler and no server. Its CPU time is this process's
(user + system, every thread), so onnxruntime's own threads are counted.

Book-style baseline: the book's `TextGenerator` on the same onnxruntime model. For
every new token the whole prefix (prompt and every token so far) is fed again from a
zero state, the last position's logits become probabilities with the temperature,
and a token is drawn with `np.random.choice`. Requests are served one after another.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.engine.model import ModelSession
from simmer.bundle import load_bundle


@dataclass(frozen=True)
class EngineFigure:
    threads: int
    batch: int
    step_s: float  # median wall time of one step
    tokens_per_s: float
    cpu_per_token_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "batch": self.batch,
            "step_ms": self.step_s * 1e3,
            "tokens_per_s": self.tokens_per_s,
            "cpu_per_token_us": self.cpu_per_token_s * 1e6,
        }


def measure_engine(
    engine: ModelSession, batch: int, seconds: float, rounds: int = 3
) -> EngineFigure:
    """Decode steps at `batch` for about `seconds`: median step, throughput and CPU/token."""
    rng = np.random.default_rng(batch)
    tokens = rng.integers(2, engine.vocab_size, (batch, 1)).astype(np.int64)
    h, c = engine.zero_state(batch)
    for _ in range(3):  # warm-up: allocation and caches
        out = engine.run(tokens, h, c)
    started = time.perf_counter()
    engine.run(tokens, out.h, out.c)
    per_round = max(3, int(seconds / rounds / max(time.perf_counter() - started, 1e-5)))
    steps: list[float] = []
    wall = cpu = 0.0
    for _ in range(rounds):
        cpu_at, wall_at = time.process_time(), time.perf_counter()
        for _ in range(per_round):
            step_at = time.perf_counter()
            out = engine.run(tokens, out.h, out.c)
            steps.append(time.perf_counter() - step_at)
        wall += time.perf_counter() - wall_at
        cpu += time.process_time() - cpu_at
    count = batch * per_round * rounds
    return EngineFigure(
        engine.intra_op_threads, batch, statistics.median(steps), count / wall, cpu / count
    )


def engine_table(
    bundle: Path, threads: list[int], batches: list[int], seconds: float
) -> list[EngineFigure]:
    figures = []
    loaded = load_bundle(bundle)
    for n in threads:
        engine = ModelSession(loaded, ["CPUExecutionProvider"], n)
        for batch in batches:
            figures.append(measure_engine(engine, batch, seconds))
        del engine
    return figures


# --- the book's TextGenerator ----------------------------------------------------------


def book_generate(
    engine: ModelSession,
    prompt_ids: list[int],
    max_new: int,
    temperature: float,
    rng: np.random.Generator,
) -> int:
    """The book's loop: re-run the whole prefix for every token. Returns tokens generated."""
    tokens = list(prompt_ids)
    generated = 0
    h, c = engine.zero_state(1)
    while generated < max_new:
        out = engine.run(np.array([tokens], dtype=np.int64), h, c)
        logits = out.logits[0].astype(np.float64)
        probs = np.exp((logits - logits.max()) / temperature)
        probs /= probs.sum()
        token = int(rng.choice(len(probs), p=probs))
        generated += 1
        if token == 0:  # the book stops at the padding token
            break
        tokens.append(token)
    return generated


def book_baseline(
    bundle: Path, threads: int, prompt: str, requests: int, max_new: int
) -> dict[str, Any]:
    """Requests one after another, book-style: tokens/s and seconds per request."""
    loaded = load_bundle(bundle)
    engine = ModelSession(loaded, ["CPUExecutionProvider"], threads)
    prompt_ids = loaded.tokenizer.encode(prompt)
    rng = np.random.default_rng(0)
    book_generate(engine, prompt_ids, 4, 1.0, rng)  # warm-up
    total = 0
    latencies = []
    started = time.perf_counter()
    for _ in range(requests):
        at = time.perf_counter()
        total += book_generate(engine, prompt_ids, max_new, 1.0, rng)
        latencies.append(time.perf_counter() - at)
    wall = time.perf_counter() - started
    return {
        "threads": threads,
        "requests": requests,
        "max_tokens": max_new,
        "tokens": total,
        "wall_s": wall,
        "tokens_per_s": total / wall,
        "request_latency_s": statistics.median(latencies),
    }
