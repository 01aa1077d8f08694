"""The raw engine and the book-style baselines, measured in this process.

Raw engine: `ModelSession.run` over batches of one decode step each, as the scheduler calls
it, with no sampling, no scheduler and no server. Its CPU time is this process's
(user + system, every thread), so onnxruntime's own threads are counted.

Book-style baselines: the book's `TextGenerator` on the same onnxruntime model. For
every new token the whole prefix (prompt and every token so far) is fed again from a
zero state, the last position's row becomes probabilities with the temperature (the
book's `probs ** (1 / temperature)`, renormalised), and a token is drawn with
`np.random.choice`. Requests are served one after another. Two graphs run the loop:

- "last position only": model.onnx, which applies the output layer at the last
  position alone: the book's loop as simmer's own graph would run it;
- "as written": the bundle's `sequence_logprobs` graph, which applies the output layer
  and the (log-)softmax at every position, as the book's Keras model does
  (`Dense(10000, softmax)` on `return_sequences=True`); `predict` returns every row and
  the generator keeps the last. Log-softmax and softmax cost the same (one exp per
  word and a sum per row); the loop uses exp(logprob / T), the book's p ** (1 / T).

The book's generator predicts one prefix per call, so 64 concurrent book streams are
64 batch-1 prefix re-runs per token step: the work of 64 requests one after another,
at the tokens/s of one stream. `book_batching` measures whether one batched call over
the 64 prefixes would have been faster.

`sampling_ceiling` is the engine with the server's sampler: the raw decode step against
the same step with its tokens drawn by the bundle's sampling head (the envelope above
`SMALL_BATCH` rows) and fed back, rounds alternating. Their CPU per token bounds the
CPU efficiency of any server that samples exactly with that head: the most it reaches
if the event loop, the scheduler and the network cost nothing (and without the
server's [UNK] ban, which only adds to its cost).

`engine_core_load` is the realistic load on the engine core alone: the server's own
engine (scheduler, sampling head, decode runs, output processor) under the same clients,
prompt and token limit, each a coroutine on the server's event loop (uvloop) that
submits a request, only waits for it to end and submits the next, with no server,
sessions or messages. It runs beside the raw decode step, rounds alternating. The CPU
of every thread but the event loop's (the engine worker: the scheduler, the model, the
sampling head; and onnxruntime's pool where it has one) gives a ceiling on the CPU
efficiency of a server on that engine under that load: such a server runs the same
worker, and its event loop on top. It is a measured ceiling, not a proof: the worker's
cost per token depends on its batches, and a server's clients arrive later than these
(they connect first), which leaves its batches smaller, and a smaller batch costs
more per token.

`decode_with_scorer` shows that decoding does not pay for the scoring graph: the raw
decode step's cost with no scorer in the process and with one opened and warmed (its
session and memory arena allocated), rounds alternating. With one intra-op thread the
cost is the calling thread's CPU time, which other work on the machine does not enter.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.engine.core import build_engine
from service.engine.head import SamplingHead
from service.engine.model import ModelSession
from service.engine.output import Hooks, StepStats
from service.engine.params import BAN, SamplingParams, Uniforms, make_rng
from service.engine.request import Request
from service.engine.scoring import Scorer
from simmer.bundle import SEQUENCE_LOGPROBS, ModelBundle, load_bundle
from simmer.ort import open_session
from simmer.tokenizer import UNK_ID


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

# a prefix (1, T) int64 -> the scores of the next word after its last position, (V,)
NextRow = Callable[[np.ndarray], np.ndarray]


def last_position(engine: ModelSession) -> NextRow:
    """The book's predict on model.onnx: logits of the last position only."""

    def row(tokens: np.ndarray) -> np.ndarray:
        h, c = engine.zero_state(len(tokens))
        logits: np.ndarray = engine.run(tokens, h, c).logits
        return np.asarray(logits[0])

    return row


def every_position(session: ort.InferenceSession, layers: int, hidden: int) -> NextRow:
    """The book's predict as written: logprobs at every position, the last row kept."""

    def row(tokens: np.ndarray) -> np.ndarray:
        state = np.zeros((layers, len(tokens), hidden), np.float32)
        feeds = {"tokens": tokens, "h0": state, "c0": state}
        logprobs: np.ndarray = session.run(["logprobs"], feeds)[0]  # (B, T, V)
        return np.asarray(logprobs[0, -1])

    return row


def book_generate(
    next_row: NextRow,
    prompt_ids: list[int],
    max_new: int,
    temperature: float,
    rng: np.random.Generator,
) -> int:
    """The book's loop: re-run the whole prefix for every token. Returns tokens generated."""
    tokens = list(prompt_ids)
    generated = 0
    while generated < max_new:
        scores = next_row(np.array([tokens], dtype=np.int64)).astype(np.float64)
        probs = np.exp((scores - scores.max()) / temperature)
        probs /= probs.sum()
        token = int(rng.choice(len(probs), p=probs))
        generated += 1
        if token == 0:  # the book stops at the padding token
            break
        tokens.append(token)
    return generated


def scoring_session(bundle: ModelBundle, threads: int) -> ort.InferenceSession | None:
    """The bundle's sequence_logprobs graph under the engine's settings, or None."""
    graph = bundle.graph(SEQUENCE_LOGPROBS)
    return None if graph is None else open_session(graph.path, threads)


def book_baseline(
    bundle: Path, threads: int, prompt: str, requests: int, max_new: int, as_written: bool = False
) -> dict[str, Any]:
    """Requests one after another, book-style: tokens/s and seconds per request. With
    `as_written`, on the every-position graph; an "error" where the bundle has none."""
    loaded = load_bundle(bundle)
    if as_written:
        session = scoring_session(loaded, threads)
        if session is None:
            return {"error": f"the bundle has no {SEQUENCE_LOGPROBS} graph"}
        next_row = every_position(session, loaded.num_layers, loaded.hidden_size)
        graph = f"{SEQUENCE_LOGPROBS}.onnx (output layer and log-softmax at every position)"
    else:
        next_row = last_position(ModelSession(loaded, ["CPUExecutionProvider"], threads))
        graph = "model.onnx (output layer at the last position only)"
    prompt_ids = loaded.tokenizer.encode(prompt)
    rng = np.random.default_rng(0)
    book_generate(next_row, prompt_ids, 4, 1.0, rng)  # warm-up
    total = 0
    latencies = []
    started = time.perf_counter()
    for _ in range(requests):
        at = time.perf_counter()
        total += book_generate(next_row, prompt_ids, max_new, 1.0, rng)
        latencies.append(time.perf_counter() - at)
    wall = time.perf_counter() - started
    return {
        "graph": graph,
        "threads": threads,
        "requests": requests,
        "max_tokens": max_new,
        "tokens": total,
        "wall_s": wall,
        "tokens_per_s": total / wall,
        "request_latency_s": statistics.median(latencies),
    }


def book_batching(
    bundle: Path, threads: int, prefix: int, streams: int, repeats: int
) -> dict[str, Any]:
    """One token step of `streams` book streams as written, at a prefix of `prefix`
    tokens: one batched call over every prefix against one call per prefix (the book's
    generator), median milliseconds of `repeats`."""
    loaded = load_bundle(bundle)
    session = scoring_session(loaded, threads)
    if session is None:
        return {"error": f"the bundle has no {SEQUENCE_LOGPROBS} graph"}
    next_row = every_position(session, loaded.num_layers, loaded.hidden_size)
    rng = np.random.default_rng(prefix)
    tokens = rng.integers(2, loaded.vocab_size, (streams, prefix)).astype(np.int64)
    times: dict[str, list[float]] = {"one_call": [], "separate_calls": []}
    for _ in range(repeats + 1):  # the first round warms up
        at = time.perf_counter()
        next_row(tokens)  # every row computed; predict would return them all
        one = time.perf_counter() - at
        at = time.perf_counter()
        for stream in range(streams):
            next_row(tokens[stream : stream + 1])
        times["one_call"].append(one)
        times["separate_calls"].append(time.perf_counter() - at)
    one_ms = statistics.median(times["one_call"][1:]) * 1e3
    separate_ms = statistics.median(times["separate_calls"][1:]) * 1e3
    return {
        "streams": streams,
        "prefix_tokens": prefix,
        "repeats": repeats,
        "one_call_ms": one_ms,
        "separate_calls_ms": separate_ms,
        "batching_speedup": separate_ms / one_ms if one_ms else None,
    }


# --- decoding beside the scorer ------------------------------------------------------------


def step_cost_ms(engine: ModelSession, batch: int, seconds: float) -> float:
    """The median cost of one decode step at `batch`, in ms, over about `seconds`. With one
    intra-op thread onnxruntime computes on the calling thread, so that thread's CPU time
    is the step's cost whatever else the machine runs; with more, the wall time."""
    clock = time.thread_time if engine.intra_op_threads == 1 else time.perf_counter
    rng = np.random.default_rng(batch)
    tokens = rng.integers(2, engine.vocab_size, (batch, 1)).astype(np.int64)
    out = engine.run(tokens, *engine.zero_state(batch))  # warm-up
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 5:
        started = clock()
        out = engine.run(tokens, out.h, out.c)
        samples.append(clock() - started)
    return statistics.median(samples) * 1e3


def decode_with_scorer(
    bundle: Path, threads: int, batches: list[int], seconds: float, rounds: int
) -> dict[str, Any]:
    """The decode step's cost (`step_cost_ms`) at each batch size without a scorer in the
    process and with one (opened, warmed, and a full chunk scored so its memory is
    allocated), the two taking turns first; per batch the median of each over the
    rounds and their ratio (with / without), and the larger ratio."""
    loaded = load_bundle(bundle)
    if loaded.graph(SEQUENCE_LOGPROBS) is None:
        return {"error": f"the bundle has no {SEQUENCE_LOGPROBS} graph"}
    engine = ModelSession(loaded, ["CPUExecutionProvider"], threads)
    steps: dict[str, dict[int, list[float]]] = {
        kind: {batch: [] for batch in batches} for kind in ("without", "with")
    }

    def measure(kind: str) -> None:
        for batch in batches:
            steps[kind][batch].append(step_cost_ms(engine, batch, seconds / 2))

    for number in range(rounds):
        if number % 2:
            measure("without")
        scorer = Scorer.from_bundle(loaded)
        assert scorer is not None  # the bundle has the graph
        scorer.score(*scorer.zero_state(), [t % loaded.vocab_size for t in range(scorer.chunk)])
        measure("with")
        del scorer
        if not number % 2:
            measure("without")
    figures = {
        str(batch): {
            "step_ms_without": statistics.median(steps["without"][batch]),
            "step_ms_with": statistics.median(steps["with"][batch]),
        }
        for batch in batches
    }
    for figure in figures.values():
        figure["ratio"] = figure["step_ms_with"] / figure["step_ms_without"]
    return {
        "rounds": rounds,
        "threads": threads,
        "clock": "thread CPU time" if threads == 1 else "wall time",
        "batches": figures,
        "ratio": max(figure["ratio"] for figure in figures.values()),
    }


# --- the engine with the server's sampler: what serving could reach at best --------------


def alternating_medians(
    rounds: int, first: Callable[[], float], second: Callable[[], float]
) -> tuple[float, float]:
    """The medians of `rounds` measurements by each of `first` and `second`, the two
    taking turns to go first, so a slow spell of the machine does not fall on one."""
    samples: tuple[list[float], list[float]] = ([], [])
    for number in range(rounds):
        order = (0, 1) if number % 2 == 0 else (1, 0)
        for which in order:
            samples[which].append((first, second)[which]())
    return statistics.median(samples[0]), statistics.median(samples[1])


def sampled_cpu_per_token(
    engine: ModelSession, head: SamplingHead, batch: int, seconds: float
) -> float:
    """CPU seconds per token of decode steps at `batch`, each sampled by `head` as the
    server samples a plain request (temperature 1, the whole distribution) and the
    drawn tokens fed back, for about `seconds`."""
    tokens = np.random.default_rng(batch).integers(2, engine.vocab_size, (batch, 1))
    tokens = tokens.astype(np.int64)
    inv_t = np.ones(batch, np.float32)
    h, c = engine.zero_state(batch)
    rngs = [Uniforms(make_rng(batch))] * batch  # unseeded rows share one generator
    steps = cpu = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or steps < 5:
        started = time.process_time()
        out = engine.run(tokens, h, c)
        tokens = head.sample(out.logits, inv_t, rngs).reshape(-1, 1)
        cpu += time.process_time() - started
        h, c, steps = out.h, out.c, steps + 1
    return cpu / (steps * batch)


def sampling_ceiling(
    bundle: Path, threads: int, batch: int, seconds: float, rounds: int
) -> dict[str, Any]:
    """The raw engine's CPU per token at `batch` against the same steps sampled by the
    server's sampling head, rounds alternating: their quotient is the CPU efficiency a
    server would reach if everything but the model and the sampler cost nothing."""
    loaded = load_bundle(bundle)
    engine = ModelSession(loaded, ["CPUExecutionProvider"], threads)
    head = SamplingHead.from_bundle(loaded, threads)
    if head is None:
        return {"error": "the bundle has no sampling graphs"}
    raw_cpu, sampled_cpu = alternating_medians(
        rounds,
        lambda: measure_engine(engine, batch, seconds).cpu_per_token_s * 1e6,
        lambda: sampled_cpu_per_token(engine, head, batch, seconds) * 1e6,
    )
    return {
        "batch": batch,
        "rounds": rounds,
        "raw_cpu_per_token_us": raw_cpu,
        "sampled_cpu_per_token_us": sampled_cpu,
        "sampling_cpu_per_token_us": sampled_cpu - raw_cpu,
        "ceiling": raw_cpu / sampled_cpu if sampled_cpu > 0 else None,
    }


@dataclass(frozen=True)
class CoreLoad:
    """What the realistic load on the engine core alone asks: the server's settings."""

    streams: int  # clients, each with one generation at a time
    requests: int  # generations per client, one after another
    max_tokens: int
    prompt: str
    max_batch: int
    max_stride: int  # the server's max_coalesce_steps
    decode_runs: bool
    ban_unk: bool


CORE_ROUND_TIMEOUT_S = 600.0  # a round that takes longer has a stuck engine


async def _core_round(model: ModelSession, load: CoreLoad) -> dict[str, float]:
    """One round of `load` on a fresh engine core over `model`: per generated token, the
    process's CPU and that of every thread but the event loop's (the engine worker, and
    onnxruntime's pool where it has one); the tokens per generation and the mean batch
    of its steps. RuntimeError if a generation ended otherwise than by eos or length."""
    batches: list[int] = []

    def on_step(stats: StepStats) -> None:
        batches.append(stats.batch_size)

    engine = build_engine(
        model, load.max_batch, Hooks(on_step), load.max_stride, decode_runs=load.decode_runs
    )
    engine.start()
    prompt = model.bundle.tokenizer.encode(load.prompt)
    bans = ((UNK_ID, BAN),) if load.ban_unk else ()
    h, c = model.zero_state(1)
    tokens = 0
    failed: list[str] = []

    async def client() -> None:
        nonlocal tokens
        for _ in range(load.requests):
            request = engine.submit(
                Request(
                    feed=list(prompt),
                    h=h[:, 0],
                    c=c[:, 0],
                    params=SamplingParams(logit_bias=bans),
                    max_new_tokens=load.max_tokens,
                )
            )
            while not request.done:
                await request.event.wait()
                request.event.clear()
            if request.finish_reason not in ("eos", "length"):
                failed.append(str(request.finish_reason))
                return
            tokens += len(request.tokens)

    try:
        started, loop_at = time.process_time(), time.thread_time()
        clients = asyncio.gather(*(client() for _ in range(load.streams)))
        await asyncio.wait_for(clients, CORE_ROUND_TIMEOUT_S)
        loop = time.thread_time() - loop_at
        cpu = time.process_time() - started
    finally:
        await engine.close()
    if failed or not tokens:
        raise RuntimeError(
            f"the engine core ended {len(failed)} generations otherwise than by eos or "
            f"length ({', '.join(sorted(set(failed))) or 'and generated no token'})"
        )
    return {
        "cpu_per_token_us": cpu / tokens * 1e6,
        "worker_cpu_per_token_us": (cpu - loop) / tokens * 1e6,
        "tokens_per_generation": tokens / (load.streams * load.requests),
        "mean_batch": statistics.fmean(batches) if batches else 0.0,
    }


def _run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    """Run `main` on the event loop the server's uvicorn picks: uvloop where installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def engine_core_load(
    bundle: Path, threads: int, batch: int, seconds: float, rounds: int, load: CoreLoad
) -> dict[str, Any]:
    """`load` on the engine core alone (see the module docstring) against the raw decode
    step at `batch`, `rounds` of each, alternating: the medians of their CPU per token,
    the process's and that of the engine's side alone (every thread but the event
    loop's). The raw step over the engine's side is the ceiling; {"error": reason} where
    the engine core failed the load."""
    loaded = load_bundle(bundle)
    model = ModelSession(loaded, ["CPUExecutionProvider"], threads)
    figures: list[dict[str, float]] = []

    def core() -> float:
        figures.append(_run_loop(_core_round(model, load)))
        return figures[-1]["cpu_per_token_us"]

    try:
        _run_loop(_core_round(model, replace(load, streams=min(load.streams, 8), requests=1)))
        raw_cpu, core_cpu = alternating_medians(
            rounds, lambda: measure_engine(model, batch, seconds).cpu_per_token_s * 1e6, core
        )
    except (RuntimeError, TimeoutError) as exc:
        return {"error": str(exc) or "a round of the engine core timed out"}
    worker_cpu = statistics.median(f["worker_cpu_per_token_us"] for f in figures)
    return {
        "batch": batch,
        "rounds": rounds,
        "raw_cpu_per_token_us": raw_cpu,
        "core_cpu_per_token_us": core_cpu,  # the process: the engine's side and the loop's
        "worker_cpu_per_token_us": worker_cpu,
        "tokens_per_generation": statistics.median(f["tokens_per_generation"] for f in figures),
        "mean_batch": statistics.median(f["mean_batch"] for f in figures),
        "ceiling": raw_cpu / worker_cpu if worker_cpu > 0 else None,
    }


# --- decode runs at one stream: what inter-token latency could reach at best --------------


def run_step_ms(engine: ModelSession, seconds: float) -> float:
    """The median wall time of one step of `decode_run` at batch 1, in ms, each run
    sampled as the server samples a plain request (temperature 1, [UNK] banned) and its
    last token and state fed to the next, for about `seconds`."""
    steps = engine.run_steps
    tokens = np.full((1, 1), 2, np.int64)
    h, c = engine.zero_state(1)
    inv_t, ban = np.ones(1, np.float32), np.full(1, UNK_ID, np.int64)
    rng = make_rng(1)
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 5:
        uniforms = rng.random((1, steps))
        started = time.perf_counter()
        out = engine.run_decode(tokens, h, c, inv_t, ban, uniforms)
        samples.append((time.perf_counter() - started) / steps)
        tokens, h, c = np.ascontiguousarray(out.tokens[:, -1:]), out.h[-1], out.c[-1]
    return statistics.median(samples[1:]) * 1e3  # the first pays for allocation


def run_floor(bundle: Path, threads: int, seconds: float, rounds: int) -> dict[str, Any]:
    """The raw batch-1 step against a step of `decode_run` at batch 1, rounds
    alternating: at one stream the server takes its tokens in runs, which cannot come
    faster than the run graph computes them, so their quotient bounds the inter-token
    latency in raw steps from below."""
    engine = ModelSession(load_bundle(bundle), ["CPUExecutionProvider"], threads)
    if not engine.run_steps:
        return {"error": "the bundle has no decode_run graph"}
    raw_step, run_step = alternating_medians(
        rounds,
        lambda: measure_engine(engine, 1, seconds).step_s * 1e3,
        lambda: run_step_ms(engine, seconds),
    )
    return {
        "rounds": rounds,
        "steps_per_run": engine.run_steps,
        "raw_step_ms": raw_step,
        "run_step_ms": run_step,
        "floor": run_step / raw_step if raw_step > 0 else None,
    }
