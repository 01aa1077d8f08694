"""Benchmark simmer against the raw engine and against book-style generation.

    python -m bench --out bench-results/bench.json [--bundle DIR] [--smoke]
    python -m bench --quantize int8 --data CORPUS --out bench-results/bench-int8.json
    python -m bench [--realistic-data CORPUS | --realistic-bundle DIR | --no-realistic]

Without --bundle a randomly initialised model of the book's size (vocab 10,000,
embedding 100, LSTM 128) is exported once into --cache; speed does not depend on
training. --quantize int8 serves that model's int8 export instead (output layer and
embedding in int8; the export checks it against the fp32 graph on --data). Everything
is measured in one run, so ratios compare figures taken side by side on the same
machine:

1. the raw engine (onnxruntime decode steps, no server) at batch 1 to 256, under the
   server's thread setting and others;
2. the book's generation loop on the same model (the whole prefix re-run per token),
   on model.onnx (the output layer at the last position only) and as the book wrote
   it, on the bundle's every-position graph `sequence_logprobs` (see `bench.engine`);
   and the raw decode step with and without a scorer over that graph in the process;
3. a real server process (`python -m service`) driven by a load generator in a process
   of its own: 1, 16, 64 and 256 concurrent WebSocket streams of 64 tokens, 64 SSE
   streams, 200-token generations, continuing a long session, and metrics on and off;
   server CPU is read from /proc before and after each run;
4. the realistic load: a trained book-size model (one epoch of the `book` preset on
   --realistic-data, trained and exported once into --cache, see `bench.trained`) behind
   a server of its own, 256 clients that each open a fresh WebSocket connection for
   every 64-token generation, as most clients do, beside the raw engine on that model;
5. memory per stored session, in the memory store and in Redis.

With 3 and 4 come two ceilings on the CPU efficiency (see `bench.engine`'s
`sampling_ceiling`): the raw engine against the same steps sampled by the server's
sampling head, and that with each generation's fixed cost added, estimated from the
same load served one token per generation. A third puts the bare protocol server
(`bench.bare`: uvicorn speaking simmer's WebSocket protocol with nothing behind it)
under the same load in place of everything the server does but the model and its
sampler: what any app on that ASGI server pays at least. For the realistic load a fourth
runs its clients on the server's engine core alone (`bench.engine.engine_core_load`),
consumers that only wait: the raw step over the CPU of every thread but its event
loop's is a measured ceiling for any server on that engine. Beside the inter-token latency
comes its floor (`run_floor`): a step of the bundle's decode_run graph at batch 1
against the raw step, rounds alternating.

The headline ratios compare the server with the raw engine measured right before it,
in `headline_rounds` rounds (the realistic load too; each round serves the 1-stream
and the concurrent 200-token generations again); each ratio is the median over
rounds, so one burst of load from elsewhere on the machine does not decide it.

It writes the JSON to --out, a PNG chart beside it, and prints a summary. --smoke runs
every part at tiny sizes (the test suite uses it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import engine as raw
from bench import report, sessions
from bench.load import LoadSpec
from bench.model import cached_bundle
from bench.procstat import CLOCK_TICKS
from bench.report import quotient
from bench.server import ROOT, run_load
from bench.trained import TrainedBundleError, trained_bundle
from harness.server import ServiceProcess
from simmer.bundle import SEQUENCE_LOGPROBS, ModelBundle, is_bundle

# the corpus the realistic run's model learns from: the shared Epicurious download
REALISTIC_DATA = ROOT.parent / "shared" / "data" / "epicurious" / "full_format_recipes.json"


@dataclass(frozen=True)
class BenchConfig:
    # the model built when no --bundle is given (the book's sizes)
    vocab_size: int = 10_000
    embedding_dim: int = 100
    hidden_size: int = 128
    # raw engine
    batches: tuple[int, ...] = (1, 8, 32, 64, 128, 256)
    thread_settings: tuple[int, ...] = (1, 2)  # besides the server's own
    engine_seconds: float = 1.5  # per batch size and thread setting
    # server: concurrent WebSocket streams -> requests per stream, one after another
    ws_streams: dict[int, int] = field(default_factory=lambda: {1: 16, 16: 4, 64: 4, 256: 4})
    tokens: int = 64
    sse_streams: int = 64
    sse_requests: int = 2
    prompt: str = "recipe for chicken soup | heat the oil in a large pan"
    # simmer against the book's loop: 200-token generations
    long_tokens: int = 200
    long_single_requests: int = 4
    long_concurrent: int = 64
    book_requests: int = 6
    book_written_requests: int = 3  # the book as written: about a second each, book-size
    book_batching_repeats: int = 3
    # the decode step beside a loaded scorer
    scorer_rounds: int = 6
    # continuing a long session
    history_long: int = 2000
    history_short: int = 10
    history_new: int = 32
    history_repeats: int = 10
    # n choices: one request with n = 8 against eight separate requests
    choices: int = 8
    choices_tokens: int = 64
    choices_repeats: int = 5
    # the headline ratios: rounds of raw engine and server side by side (median reported)
    headline_rounds: int = 5
    # the engine with the server's sampler against the raw engine, rounds alternating
    ceiling_rounds: int = 4
    # the realistic load: a trained model, clients x generations, each on a new connection
    realistic_streams: int = 256
    realistic_requests: int = 4
    realistic_preset: str = "book"
    realistic_epochs: int = 1
    realistic_max_recipes: int | None = None  # None: the whole corpus
    # memory per session
    sessions: int = 100_000
    # metrics on / off
    metrics_streams: int = 64
    metrics_requests: int = 2
    metrics_rounds: int = 5

    @classmethod
    def smoke(cls) -> BenchConfig:
        return cls(
            vocab_size=300,
            embedding_dim=16,
            hidden_size=32,
            batches=(1, 4),
            thread_settings=(),
            engine_seconds=0.05,
            ws_streams={1: 2, 4: 2},
            tokens=16,
            sse_streams=4,
            sse_requests=1,
            long_tokens=16,
            long_single_requests=1,
            long_concurrent=4,
            book_requests=1,
            book_written_requests=1,
            book_batching_repeats=1,
            scorer_rounds=2,
            history_long=100,
            history_short=10,
            history_new=8,
            history_repeats=2,
            choices=3,
            choices_tokens=8,
            choices_repeats=1,
            headline_rounds=2,
            ceiling_rounds=2,
            realistic_streams=4,
            realistic_requests=2,
            realistic_preset="tiny",
            realistic_max_recipes=200,
            sessions=1000,
            metrics_streams=4,
            metrics_requests=1,
            metrics_rounds=1,
        )

    @property
    def small(self) -> int:
        return min(self.ws_streams)

    @property
    def large(self) -> int:
        return max(self.ws_streams)


@dataclass(frozen=True)
class RealisticBundle:
    """The realistic run's model: where its bundle is and how it was made."""

    path: Path
    trained: str


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _machine() -> dict[str, Any]:
    import onnxruntime

    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def _ms(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: (v * 1e3 if isinstance(v, float) else v) for k, v in stats.items()}


def _figures(run: dict[str, Any]) -> dict[str, Any]:
    """A load run in the units of the report.

    The server's CPU per token is None when its CPU time rounded to 0 clock ticks: /proc
    counts whole ticks, and a tiny run can fit inside one.
    """
    cpu_per_token = run["server_cpu_per_token_s"]
    return {
        "protocol": run["protocol"],
        "streams": run["streams"],
        "requests": run["requests"],
        "max_tokens": run["max_tokens"],
        "tokens": run["tokens"],
        "wall_s": run["wall_s"],
        "tokens_per_s": run["tokens_per_s"],
        "server_cpu_s": run["server_cpu_s"],
        "server_cpu_per_token_us": cpu_per_token * 1e6 if cpu_per_token else None,
        "server_cpu_utilisation": run["server_cpu_utilisation"],
        "ttft_ms": _ms(run["ttft_s"]),
        "itl_ms": _ms(run["itl_s"]),
        "request_latency_ms": _ms(run["request_latency_s"]),
        "connect_ms": _ms(run["connect_s"]),  # n is 0 unless each request connected anew
        "tokens_per_message": run["tokens_per_message"],
        "messages_per_generation": quotient(run["token_messages"], run["requests"]),
        "finish_reasons": run["finish_reasons"],
        "errors": run["error_count"],
        "error_examples": run["errors"],
    }


def _load(
    server: ServiceProcess,
    config: BenchConfig,
    streams: int,
    requests: int,
    tokens: int,
    sse: bool = False,
) -> dict[str, Any]:
    """One load run against `server`; any error fails the benchmark."""
    spec = LoadSpec(
        url=server.base_url if sse else server.ws_url,
        protocol="sse" if sse else "ws",
        streams=streams,
        requests=requests,
        max_tokens=tokens,
        prompt=config.prompt,
    )
    run = run_load(server, spec)
    if run["error_count"]:
        raise RuntimeError(f"{run['error_count']} errors at {streams} streams: {run['errors'][:3]}")
    return _figures(run)


def _history_cost(server: ServiceProcess, config: BenchConfig, vocab: list[str]) -> dict[str, Any]:
    """Seconds per token of `history_new` tokens continuing a long or a short session."""
    words = [w for w in vocab[2:] if w.isalnum()]

    def prompt(n: int) -> str:
        return " ".join(words[i % len(words)] for i in range(n))

    per_token: dict[str, list[float]] = {"long": [], "short": []}
    with httpx.Client(base_url=server.base_url, timeout=120) as client:

        def generate(body: dict[str, Any]) -> dict[str, Any]:
            response = client.post("/v1/generate", json=body)
            response.raise_for_status()
            out: dict[str, Any] = response.json()
            return out

        for _ in range(config.history_repeats + 1):  # the first round warms up
            sessions = {
                "long": generate({"prompt": prompt(config.history_long), "max_tokens": 1}),
                "short": generate({"prompt": prompt(config.history_short), "max_tokens": 1}),
            }
            for kind, first in sessions.items():
                started = time.perf_counter()
                body = {"session_id": first["session_id"], "prompt": "and"}
                out = generate({**body, "max_tokens": config.history_new})
                seconds = time.perf_counter() - started
                per_token[kind].append(seconds / max(1, out["usage"]["completion_tokens"]))
    long = statistics.median(per_token["long"][1:])
    short = statistics.median(per_token["short"][1:])
    return {
        "history_tokens": {"long": config.history_long, "short": config.history_short},
        "new_tokens": config.history_new,
        "repeats": config.history_repeats,
        "seconds_per_token_median": {"long": long, "short": short},
        "ratio": quotient(long, short),
    }


def _choices_cost(server: ServiceProcess, config: BenchConfig) -> dict[str, Any]:
    """Wall seconds of one request with n choices against n separate requests sent at
    once, each from a fresh session with the same prompt (median of the repeats)."""
    n, tokens = config.choices, config.choices_tokens
    body = {"prompt": config.prompt, "max_tokens": tokens, "ignore_eos": True}
    seconds: dict[str, list[float]] = {"n": [], "separate": []}
    with (
        httpx.Client(base_url=server.base_url, timeout=300) as client,
        ThreadPoolExecutor(n) as pool,
    ):

        def post(payload: dict[str, Any]) -> int:
            response = client.post("/v1/generate", json=payload)
            response.raise_for_status()
            done: int = response.json()["usage"]["completion_tokens"]
            return done

        for repeat in range(config.choices_repeats + 1):  # the first round warms up
            started = time.perf_counter()
            post({**body, "n": n})
            one = time.perf_counter() - started
            started = time.perf_counter()
            list(pool.map(post, [body] * n))
            apart = time.perf_counter() - started
            if repeat:
                seconds["n"].append(one)
                seconds["separate"].append(apart)
    together, separate = statistics.median(seconds["n"]), statistics.median(seconds["separate"])
    return {
        "n": n,
        "tokens": tokens,
        "repeats": config.choices_repeats,
        "seconds_median": {"n": together, "separate": separate},
        "ratio": quotient(separate, together),
    }


def _metrics_overhead(
    bundle: Path, config: BenchConfig, on: ServiceProcess, workdir: Path, settings: dict[str, str]
) -> dict[str, Any]:
    """Throughput with metrics on (`on`) and off (a second server), rounds alternating."""
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    streams, requests = config.metrics_streams, config.metrics_requests
    with ServiceProcess(
        bundle, workdir / "server-metrics-off.log", **settings, metrics_enabled="false"
    ) as off:
        _load(off, config, streams, 1, config.tokens)  # warm-up
        for round_ in range(config.metrics_rounds):
            order = [("on", on), ("off", off)] if round_ % 2 == 0 else [("off", off), ("on", on)]
            for name, server in order:
                runs[name].append(_load(server, config, streams, requests, config.tokens))
    best = {k: max(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    median = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    cpu = {k: _median([r["server_cpu_per_token_us"] for r in v]) for k, v in runs.items()}
    return {
        "streams": streams,
        "rounds": config.metrics_rounds,
        "tokens_per_s_best": best,
        "tokens_per_s_median": median,
        "server_cpu_per_token_us_median": cpu,
        "ratio": quotient(best["on"], best["off"]),
        "cpu_ratio": quotient(cpu["off"], cpu["on"]),
    }


def _median(values: list[float | None]) -> float | None:
    """The median of the figures that were measured (finite); None when none was."""
    measured = [v for v in values if v is not None and math.isfinite(v)]
    return float(statistics.median(measured)) if measured else None


def _round(
    raw_small: dict[str, Any],
    server_small: dict[str, Any],
    raw_large: dict[str, Any],
    server_large: dict[str, Any],
    book: dict[str, Any],
    book_written: dict[str, Any],
    simmer_single: dict[str, Any],
    simmer_concurrent: dict[str, Any],
) -> dict[str, float | None]:
    """One round of the headline ratios, from figures taken one right after the other.

    A ratio is None where its denominator was not measured or is 0 (the book as written
    is not measured for a bundle without the every-position graph).
    """
    written = book_written.get("tokens_per_s")
    itl = server_small["itl_ms"]["p50"]  # None when every token came in one message
    server_cpu = server_large["server_cpu_per_token_us"]  # None below one clock tick
    return {
        "raw_step_ms_small": raw_small["step_ms"],
        "itl_ms_p50_small": itl,
        "itl_ratio": quotient(itl, raw_small["step_ms"]),
        "raw_cpu_per_token_us_large": raw_large["cpu_per_token_us"],
        "server_cpu_per_token_us_large": server_cpu,
        "cpu_efficiency": quotient(raw_large["cpu_per_token_us"], server_cpu),
        "throughput_ratio": quotient(server_large["tokens_per_s"], raw_large["tokens_per_s"]),
        "messages_per_generation_large": server_large["messages_per_generation"],
        "book_tokens_per_s": book["tokens_per_s"],
        "simmer_single_tokens_per_s": simmer_single["tokens_per_s"],
        "simmer_book_single": quotient(simmer_single["tokens_per_s"], book["tokens_per_s"]),
        "book_written_tokens_per_s": written,
        "book_written_raw_steps": quotient(quotient(1e3, written), raw_small["step_ms"]),
        "simmer_book_written_single": quotient(simmer_single["tokens_per_s"], written),
        "simmer_concurrent_tokens_per_s": simmer_concurrent["tokens_per_s"],
        "simmer_book_concurrent": quotient(simmer_concurrent["tokens_per_s"], book["tokens_per_s"]),
        "simmer_book_written_concurrent": quotient(simmer_concurrent["tokens_per_s"], written),
        "book_raw_steps": quotient(quotient(1e3, book["tokens_per_s"]), raw_small["step_ms"]),
    }


def _bundle_info(path: Path, loaded: ModelBundle) -> dict[str, Any]:
    """What the report says about a bundle: its path, version and sizes."""
    embedding = loaded.manifest["model"].get("embedding_dim")
    weights = "int8" if loaded.manifest.get("quantization") else "fp32"
    return {
        "path": str(path),
        "version": loaded.version,
        "vocab_size": loaded.vocab_size,
        "embedding_dim": embedding,
        "hidden_size": loaded.hidden_size,
        "num_layers": loaded.num_layers,
        "weights": weights,
        "description": f"vocab {loaded.vocab_size}, embedding {embedding}, "
        f"LSTM {loaded.hidden_size} x {loaded.num_layers}, {weights} ({loaded.version})",
    }


def _realistic_round(raw_large: dict[str, Any], served: dict[str, Any]) -> dict[str, Any]:
    """One round of the realistic load: the raw engine on the trained model, then the
    server on it, one right after the other."""
    raw_cpu, server_cpu = raw_large["cpu_per_token_us"], served["server_cpu_per_token_us"]
    return {
        "raw_cpu_per_token_us": raw_cpu,
        "server_cpu_per_token_us": server_cpu,  # None below one clock tick
        "cpu_efficiency": quotient(raw_cpu, server_cpu),
        "tokens": served["tokens"],
        "tokens_per_s": served["tokens_per_s"],
        "ttft_ms": served["ttft_ms"],
        "connect_ms": served["connect_ms"],
        "tokens_per_message": served["tokens_per_message"],
        "messages_per_generation": served["messages_per_generation"],
        "finish_reasons": served["finish_reasons"],
        "errors": served["errors"],
        "error_examples": served["error_examples"],
    }


def _realistic(
    model: RealisticBundle | str,
    config: BenchConfig,
    threads: int,
    settings: dict[str, str],
    workdir: Path,
) -> dict[str, Any]:
    """The trained model's server under a connection per generation, in rounds beside
    the raw engine on the same model; `model` is a reason when there is none.

    Errors are counted, not raised: reconnecting clients are the load most likely to
    meet a limit, and the count is one of the figures.
    """
    from service.engine.model import ModelSession
    from simmer.bundle import load_bundle

    if isinstance(model, str):
        return {"skipped": model}
    loaded = load_bundle(model.path)
    engine = ModelSession(loaded, ["CPUExecutionProvider"], threads)
    streams, requests, large = config.realistic_streams, config.realistic_requests, config.large
    rounds = []
    with ServiceProcess(model.path, workdir / "server-realistic.log", **settings) as server:
        _load(server, config, 4, 1, 8)  # warm-up
        spec = LoadSpec(
            url=server.ws_url,
            protocol="ws",
            streams=streams,
            requests=requests,
            max_tokens=config.tokens,
            reconnect=True,
            prompt=config.prompt,
        )
        for number in range(1, config.headline_rounds + 1):
            log(
                f"realistic round {number}/{config.headline_rounds}: {streams} clients x "
                f"{requests} connections x {config.tokens} tokens"
            )
            raw_large = raw.measure_engine(engine, large, config.engine_seconds).as_dict()
            rounds.append(_realistic_round(raw_large, _figures(run_load(server, spec))))
        log(f"realistic load, one token each: {streams} clients x {requests} connections")
        one_token = _one_token_cost(server, spec, config.ceiling_rounds)
    log(f"engine with the server's sampler at batch {large}, realistic model")
    ceiling = raw.sampling_ceiling(
        model.path, threads, large, config.engine_seconds, config.ceiling_rounds
    )
    log(f"the engine core alone under the realistic load: {config.ceiling_rounds} rounds")
    core = raw.engine_core_load(
        model.path,
        threads,
        large,
        config.engine_seconds,
        config.ceiling_rounds,
        _core_load(config, int(settings["max_batch"])),
    )
    messages = _median([r["messages_per_generation"] for r in rounds])
    bare = _bare_floor(model.path, workdir, spec, messages, config.ceiling_rounds, settings)
    generations = sum(r["connect_ms"]["n"] for r in rounds)
    tokens_per_generation = quotient(sum(r["tokens"] for r in rounds), generations)
    return {
        "bundle": {**_bundle_info(model.path, loaded), "trained": model.trained},
        "streams": streams,
        "requests_per_stream": requests,
        "max_tokens": config.tokens,
        "raw_batch": large,
        "rounds": rounds,
        "sampling_ceiling": ceiling,
        "one_token": one_token,  # a generation's fixed cost: connect, one token, save, close
        "tokens_per_generation": tokens_per_generation,
        "ceiling_with_fixed_cost": _fixed_cost_ceiling(
            ceiling, one_token["cpu_per_generation_us"], tokens_per_generation
        ),
        "bare_server": bare,
        "ceiling_with_bare_server": _bare_ceiling(ceiling, bare["cpu_per_token_us"]),
        "engine_core": core,
        "ceiling_engine_core_with_bare_server": _bare_ceiling(
            core, bare["cpu_per_token_us"], WORKER_COST
        ),
    }


WORKER_COST = "worker_cpu_per_token_us"  # the engine core's side, in `engine_core_load`


def _core_load(config: BenchConfig, max_batch: int) -> raw.CoreLoad:
    """The realistic load's clients, prompt and limit, with the server's engine settings."""
    from service.settings import Settings

    defaults = Settings()
    return raw.CoreLoad(
        streams=config.realistic_streams,
        requests=config.realistic_requests,
        max_tokens=config.tokens,
        prompt=config.prompt,
        max_batch=max_batch,
        max_stride=defaults.max_coalesce_steps,
        decode_runs=defaults.decode_runs,
        ban_unk=defaults.ban_unk,
    )


def _bare_floor(
    bundle: Path,
    workdir: Path,
    spec: LoadSpec,
    messages: float | None,
    rounds: int,
    settings: dict[str, str],
) -> dict[str, Any]:
    """`spec`'s load on the bare protocol server (`bench.bare`, with the server's
    `settings`), `rounds` times: its CPU per token (the median; None where every round
    was below one clock tick). Each generation runs to `spec.max_tokens` in at most the
    server's token messages per generation, rounded down: no more messages, and no fewer
    tokens to spread each connection over, than the server had."""
    most = max(1, math.floor(messages or 1))
    log(f"bare protocol server, {most} token messages a generation: {rounds} rounds")
    per_token: list[float | None] = []
    sent = None
    with ServiceProcess(
        bundle,
        workdir / f"server-bare-{spec.streams}-{'new' if spec.reconnect else 'kept'}.log",
        "bench.bare",
        **settings,
        bare_messages=str(most),
    ) as server:
        run_load(server, replace(spec, url=server.ws_url, streams=8, requests=1))  # warm-up
        for _ in range(rounds):
            run = run_load(server, replace(spec, url=server.ws_url))
            cpu = run["server_cpu_s"]
            per_token.append(quotient(cpu * 1e6, run["tokens"]) if cpu else None)
            sent = quotient(run["token_messages"], run["requests"])
    return {
        "messages_per_generation": sent,
        "server_messages_per_generation": messages,
        "rounds": rounds,
        "cpu_per_token_us": _median(per_token),
    }


def _bare_ceiling(
    ceiling: dict[str, Any], extra_us: float | None, cost: str = "sampled_cpu_per_token_us"
) -> float | None:
    """The CPU efficiency if serving cost only what `ceiling[cost]` measured (the model
    and its sampler; or the engine core's side, "worker_cpu_per_token_us") and
    `extra_us` of CPU per token (the bare protocol server's on the same load, or each
    generation's fixed cost spread over its tokens); None where a figure is missing."""
    if "error" in ceiling or extra_us is None:
        return None
    return quotient(ceiling["raw_cpu_per_token_us"], ceiling[cost] + extra_us)


def _one_token_cost(server: ServiceProcess, spec: LoadSpec, rounds: int) -> dict[str, Any]:
    """`spec`'s load with one token per generation, `rounds` times: the server's CPU per
    generation that ended without an error (the median of the rounds; None where every
    round was below one clock tick), the fixed cost of one (its messages in and out, its
    session, and with `reconnect` its connection) and one step's."""
    per_generation: list[float | None] = []
    generations = errors = 0
    for _ in range(rounds):
        run = run_load(server, replace(spec, max_tokens=1))
        ended = sum(run["finish_reasons"].values())
        generations, errors = generations + ended, errors + run["error_count"]
        cpu = run["server_cpu_s"]
        per_generation.append(quotient(cpu * 1e6, ended) if cpu else None)
    return {
        "rounds": rounds,
        "generations": generations,
        "cpu_per_generation_us": _median(per_generation),
        "errors": errors,
    }


def _fixed_cost_ceiling(
    ceiling: dict[str, Any], per_generation_us: float | None, tokens_per_generation: float | None
) -> float | None:
    """The CPU efficiency if serving cost only the model, the sampler and each
    generation's fixed cost, spread over the load's tokens per generation; None where a
    figure is missing. The fixed cost is a one-token generation's CPU less the one
    sampled step it holds, which the sampled steps already count."""
    if "error" in ceiling or per_generation_us is None or not tokens_per_generation:
        return None
    fixed = max(per_generation_us - ceiling["sampled_cpu_per_token_us"], 0.0)
    return _bare_ceiling(ceiling, fixed / tokens_per_generation)


def run(
    config: BenchConfig,
    bundle: Path,
    out: Path,
    redis_url: str | None,
    threads: int | None,
    realistic: RealisticBundle | str,
) -> dict[str, Any]:
    """Every part of the benchmark; `realistic` is the realistic run's model, or the
    reason it is skipped."""
    from service.engine.model import ModelSession
    from service.settings import Settings
    from simmer.bundle import load_bundle

    started = time.perf_counter()
    loaded = load_bundle(bundle)
    defaults = Settings()
    server_threads = defaults.intra_op_threads if threads is None else threads
    settings = {
        "intra_op_threads": str(server_threads),
        "max_batch": str(defaults.max_batch),
        "log_level": "warning",
    }
    workdir = out.parent
    result: dict[str, Any] = {
        "simmer_bench": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "machine": _machine(),
        "bundle": _bundle_info(bundle, loaded),
        "server_settings": {"intra_op_threads": server_threads, "max_batch": defaults.max_batch},
    }
    small, large = config.small, config.large

    # 1. the raw engine
    thread_list = [server_threads, *[t for t in config.thread_settings if t != server_threads]]
    log(f"raw engine: threads {thread_list}, batches {list(config.batches)}")
    table = raw.engine_table(bundle, thread_list, list(config.batches), config.engine_seconds)
    best = {}
    for batch in config.batches:
        rows = [f for f in table if f.batch == batch]
        fastest = max(rows, key=lambda f: f.tokens_per_s)
        cheapest = min(rows, key=lambda f: f.cpu_per_token_s)
        best[str(batch)] = {
            "tokens_per_s": fastest.tokens_per_s,
            "tokens_per_s_threads": fastest.threads,
            "cpu_per_token_us": cheapest.cpu_per_token_s * 1e6,
            "cpu_threads": cheapest.threads,
        }
    result["engine"] = {
        "server_threads": server_threads,
        "table": [f.as_dict() for f in table],
        "best_over_threads": best,
    }
    engine = ModelSession(loaded, ["CPUExecutionProvider"], server_threads)

    def adjacent(batch: int) -> dict[str, Any]:
        """The raw engine again, right before the server run it is compared with."""
        return raw.measure_engine(engine, batch, config.engine_seconds).as_dict()

    def book() -> dict[str, Any]:
        return raw.book_baseline(
            bundle, server_threads, config.prompt, config.book_requests, config.long_tokens
        )

    def book_written() -> dict[str, Any]:
        return raw.book_baseline(
            bundle,
            server_threads,
            config.prompt,
            config.book_written_requests,
            config.long_tokens,
            as_written=True,
        )

    log(f"decode step with and without a scorer: {config.scorer_rounds} rounds")
    result["decode_with_scorer"] = raw.decode_with_scorer(
        bundle, server_threads, [small, large], config.engine_seconds, config.scorer_rounds
    )

    # 2. book-style generation
    log(f"book-style baseline: {config.book_requests} x {config.long_tokens} tokens")
    result["book"] = book()
    log(f"book as written: {config.book_written_requests} x {config.long_tokens} tokens")
    result["book_as_written"] = book_written()
    prefix = len(loaded.tokenizer.encode(config.prompt)) + config.long_tokens // 2
    log(f"book as written, {config.long_concurrent} prefixes of {prefix} tokens: batched?")
    result["book_as_written_batching"] = raw.book_batching(
        bundle, server_threads, prefix, config.long_concurrent, config.book_batching_repeats
    )

    # 3. the server
    result["server"] = {}
    rounds = []
    with ServiceProcess(bundle, workdir / "server.log", **settings) as server:
        _load(server, config, 4, 1, 8)  # warm-up
        raw_at: dict[int, dict[str, Any]] = {}
        for streams, requests in sorted(config.ws_streams.items()):
            if streams in (small, large):
                raw_at[streams] = adjacent(streams)
            log(f"server: {streams} WebSocket stream(s) x {requests} x {config.tokens} tokens")
            result["server"][f"ws-{streams}"] = _load(
                server, config, streams, requests, config.tokens
            )
        log(f"server: {config.sse_streams} SSE streams")
        result["server"][f"sse-{config.sse_streams}"] = _load(
            server, config, config.sse_streams, config.sse_requests, config.tokens, sse=True
        )
        log(f"simmer, {config.long_tokens} tokens: 1 and {config.long_concurrent} streams")
        result["simmer_long"] = {
            "1": _load(server, config, 1, config.long_single_requests, config.long_tokens),
            str(config.long_concurrent): _load(
                server, config, config.long_concurrent, 1, config.long_tokens
            ),
        }
        log("continuing a long session")
        result["history"] = _history_cost(server, config, loaded.tokenizer.vocab)
        log(f"n = {config.choices} against {config.choices} separate requests")
        result["choices"] = _choices_cost(server, config)
        log(f"metrics on / off: {config.metrics_rounds} rounds of {config.metrics_streams} streams")
        result["metrics_overhead"] = _metrics_overhead(bundle, config, server, workdir, settings)

        # the headline ratios: the runs above are round 1
        rounds.append(
            _round(
                raw_at[small],
                result["server"][f"ws-{small}"],
                raw_at[large],
                result["server"][f"ws-{large}"],
                result["book"],
                result["book_as_written"],
                result["simmer_long"]["1"],
                result["simmer_long"][str(config.long_concurrent)],
            )
        )
        for number in range(2, config.headline_rounds + 1):
            log(f"headline round {number}/{config.headline_rounds}")
            raw_small = adjacent(small)
            server_small = _load(server, config, small, config.ws_streams[small], config.tokens)
            raw_large = adjacent(large)
            server_large = _load(server, config, large, config.ws_streams[large], config.tokens)
            book_round, written_round = book(), book_written()
            single = _load(server, config, 1, config.long_single_requests, config.long_tokens)
            concurrent = _load(server, config, config.long_concurrent, 1, config.long_tokens)
            rounds.append(
                _round(
                    raw_small,
                    server_small,
                    raw_large,
                    server_large,
                    book_round,
                    written_round,
                    single,
                    concurrent,
                )
            )
        log(f"server: {large} streams x {config.ws_streams[large]} one-token generations")
        one_token = _one_token_cost(
            server,
            LoadSpec(
                url=server.ws_url,
                streams=large,
                requests=config.ws_streams[large],
                prompt=config.prompt,
            ),
            config.ceiling_rounds,
        )
    result["headline_rounds"] = rounds
    log(f"engine with the server's sampler at batch {large}: {config.ceiling_rounds} rounds")
    ceiling = raw.sampling_ceiling(
        bundle, server_threads, large, config.engine_seconds, config.ceiling_rounds
    )
    served = result["server"][f"ws-{large}"]
    tokens_per_generation = quotient(served["tokens"], served["requests"])
    headline = LoadSpec(
        url="",
        streams=large,
        requests=config.ws_streams[large],
        max_tokens=config.tokens,
        prompt=config.prompt,
    )
    messages = _median([r["messages_per_generation_large"] for r in rounds])
    bare = _bare_floor(bundle, workdir, headline, messages, config.ceiling_rounds, settings)
    result["sampling_ceiling"] = {
        **ceiling,
        "one_token": one_token,
        "tokens_per_generation": tokens_per_generation,
        "ceiling_with_fixed_cost": _fixed_cost_ceiling(
            ceiling, one_token["cpu_per_generation_us"], tokens_per_generation
        ),
        "bare_server": bare,
        "ceiling_with_bare_server": _bare_ceiling(ceiling, bare["cpu_per_token_us"]),
    }

    log(f"decode_run against the raw step at batch 1: {config.ceiling_rounds} rounds")
    result["itl_floor"] = raw.run_floor(
        bundle, server_threads, config.engine_seconds, config.ceiling_rounds
    )

    # 4. the realistic load
    result["realistic"] = _realistic(realistic, config, server_threads, settings, workdir)

    # 5. memory per session
    log(f"memory per session: {config.sessions:,} sessions")
    layers, hidden = loaded.num_layers, loaded.hidden_size
    result["sessions"] = {
        "memory": sessions.memory_store(config.sessions, layers, hidden),
        "record_bytes": sessions.record_bytes(layers, hidden, Settings().session_history),
    }
    if redis_url:
        try:
            result["sessions"]["redis"] = sessions.redis_store(
                redis_url, config.sessions, layers, hidden
            )
        except Exception as exc:  # no Redis: the figure is missing, the run goes on
            result["sessions"]["redis"] = {"error": f"{type(exc).__name__}: {exc}"}

    result["ratios"] = ratios(result, config)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - started
    return result


def ratios(result: dict[str, Any], config: BenchConfig) -> list[dict[str, Any]]:
    """The issue's ratios, each against its target."""
    rounds = result["headline_rounds"]
    small, large, count = config.small, config.large, len(rounds)

    def median(key: str) -> float | None:
        return _median([r[key] for r in rounds])

    written_missing = result.get("book_as_written", {}).get(
        "error", "the book-as-written tokens/s was 0 or missing in every round"
    )
    scorer = result.get("decode_with_scorer", {})
    redis = result["sessions"].get("redis", {})
    realistic = result.get("realistic", {"skipped": "the realistic load was not run"})
    realistic_rounds = realistic.get("rounds", [])
    ceiling = result.get("sampling_ceiling", {"error": "the engine with its sampler was not run"})
    floor = result.get("itl_floor", {"error": "the decode_run graph's step was not measured"})
    ticks = (
        f"the server's CPU time rounded to 0 clock ticks (1/{CLOCK_TICKS} s) in every "
        "round: too little work to measure"
    )
    return [
        report.ratio(
            f"CPU efficiency at {large} streams",
            median("cpu_efficiency"),
            0.8,
            ">=",
            f"raw engine CPU/token at batch {large} / server CPU/token at {large} streams, "
            f"median of {count} rounds",
            ticks,
        ),
        report.ratio(
            "CPU efficiency, realistic load (trained model, a connection per generation)",
            _median([r["cpu_efficiency"] for r in realistic_rounds]),
            0.6,
            ">=",
            f"raw engine CPU/token at batch {large} on the realistic run's bundle / server "
            f"CPU/token with {config.realistic_streams} clients, each opening "
            f"{config.realistic_requests} connections one after another for {config.tokens} "
            f"tokens each, median of {len(realistic_rounds)} rounds",
            realistic.get("skipped", ticks),
        ),
        report.ratio(
            f"CPU efficiency ceiling at {large} streams: the model and its sampler alone",
            ceiling.get("ceiling"),
            None,
            "",
            f"raw engine CPU/token at batch {large} / the same steps sampled by the server's "
            f"sampling head, median of {ceiling.get('rounds')} alternating rounds: the most "
            "a server sampling exactly with that head reaches if nothing else cost anything",
            ceiling.get("error", "the sampled steps took no measurable CPU time"),
        ),
        report.ratio(
            f"CPU efficiency ceiling at {large} streams: the model, its sampler and each "
            "generation's fixed cost",
            ceiling.get("ceiling_with_fixed_cost"),
            None,
            "",
            "raw engine CPU/token / (the sampled steps' CPU/token + (the server's CPU for a "
            f"one-token generation at {large} streams - one sampled step) / the tokens per "
            f"generation at {large} streams): an estimate",
            ceiling.get("error", "a figure it needs was not measured"),
        ),
        report.ratio(
            "CPU efficiency ceiling, realistic load: the model, its sampler and each "
            "generation's fixed cost",
            realistic.get("ceiling_with_fixed_cost"),
            None,
            "",
            "raw engine CPU/token / (the sampled steps' CPU/token + (the server's CPU for a "
            "one-token generation on its own connection - one sampled step) / the load's "
            "tokens per generation): an estimate",
            realistic.get("skipped", "a figure it needs was not measured"),
        ),
        report.ratio(
            f"CPU efficiency ceiling at {large} streams: the model, its sampler and a bare "
            "protocol server",
            ceiling.get("ceiling_with_bare_server"),
            None,
            "",
            "raw engine CPU/token / (the sampled steps' CPU/token + the CPU/token of uvicorn "
            "speaking the WebSocket protocol with nothing behind it, `bench.bare`, under the "
            f"same load): the most any app on that server reaches at {large} streams",
            ceiling.get("error", "a figure it needs was not measured"),
        ),
        report.ratio(
            "CPU efficiency ceiling, realistic load: the model, its sampler and a bare "
            "protocol server",
            realistic.get("ceiling_with_bare_server"),
            None,
            "",
            "raw engine CPU/token / (the sampled steps' CPU/token + the bare protocol "
            "server's CPU/token under the same connection-per-generation load): the most any "
            "app on that server reaches on it",
            realistic.get("skipped", "a figure it needs was not measured"),
        ),
        report.ratio(
            "CPU efficiency ceiling, realistic load: the engine core's worker alone",
            realistic.get("engine_core", {}).get("ceiling"),
            None,
            "",
            "raw engine CPU/token / the CPU/token of the server's engine core, every thread "
            "but the event loop's (the worker: scheduler, model, sampling head), under the "
            "same clients, prompt and token limit on the engine core alone, median of "
            "alternating rounds: a measured ceiling for a server on that engine on that load",
            realistic.get(
                "skipped",
                realistic.get("engine_core", {}).get("error", "the engine core was not measured"),
            ),
        ),
        report.ratio(
            "CPU efficiency ceiling, realistic load: the engine core's worker and a bare "
            "protocol server",
            realistic.get("ceiling_engine_core_with_bare_server"),
            None,
            "",
            "raw engine CPU/token / (the engine worker's CPU/token under the load + the bare "
            "protocol server's under the same load)",
            realistic.get("skipped", "a figure it needs was not measured"),
        ),
        report.ratio(
            f"throughput at {large} streams",
            median("throughput_ratio"),
            None,
            "",
            f"server tokens/s at {large} streams / raw engine tokens/s at batch {large}, "
            f"median of {count} rounds",
            "the raw engine's tokens/s was 0 or missing in every round",
        ),
        report.ratio(
            f"inter-token latency at {small} stream",
            median("itl_ratio"),
            1.3,
            "<=",
            f"median ITL at {small} stream / raw batch-{small} step time, median of {count} rounds",
            "every generation arrived in one message in every round: no gap between tokens",
        ),
        report.ratio(
            "inter-token latency floor at 1 stream: the decode_run graph's own step",
            floor.get("floor"),
            None,
            "",
            "a step of decode_run at batch 1 / the raw batch-1 step, median of "
            f"{floor.get('rounds')} alternating rounds: tokens that come in runs cannot come "
            "faster than the run graph computes them",
            floor.get("error", "the raw batch-1 step took no measurable time"),
        ),
        report.ratio(
            "long history cost",
            result["history"]["ratio"],
            1.2,
            "<=",
            f"seconds per token continuing {config.history_long} vs {config.history_short} "
            f"tokens of history, {config.history_new} new tokens",
            "the short-history continuation took no measurable time",
        ),
        report.ratio(
            f"{config.choices} separate requests / one with n = {config.choices}",
            result.get("choices", {}).get("ratio"),
            None,
            "",
            f"wall seconds, {config.choices_tokens} tokens each, median of "
            f"{config.choices_repeats} repeats (n feeds the prompt once)",
            "the request with n choices took no measurable time",
        ),
        report.ratio(
            "simmer / book, last position only, 1 stream",
            median("simmer_book_single"),
            3.0,
            ">=",
            f"tokens/s of {config.long_tokens}-token generations (the book's loop re-runs the "
            f"prefix through model.onnx), median of {count} rounds",
            "the book's tokens/s was 0 or missing in every round",
        ),
        report.ratio(
            "book's cost per token, in raw batch-1 steps",
            median("book_raw_steps"),
            None,
            "",
            f"seconds per token of the book's loop / raw batch-{small} step, median of {count} "
            "rounds: the most simmer / book at 1 stream could reach if serving cost nothing",
            "the book's tokens/s or the raw step time was 0 or missing in every round",
        ),
        report.ratio(
            f"simmer / book, last position only, {config.long_concurrent} concurrent",
            median("simmer_book_concurrent"),
            10.0,
            ">=",
            f"the book serves requests one after another; median of {count} rounds",
            "the book's tokens/s was 0 or missing in every round",
        ),
        report.ratio(
            "simmer / book as written, 1 stream",
            median("simmer_book_written_single"),
            30.0,
            ">=",
            f"tokens/s of {config.long_tokens}-token generations; the book's loop re-runs the "
            "prefix through the output layer and softmax at every position "
            f"({SEQUENCE_LOGPROBS}), median of {count} rounds",
            written_missing,
        ),
        report.ratio(
            "book as written's cost per token, in raw batch-1 steps",
            median("book_written_raw_steps"),
            None,
            "",
            f"seconds per token of the book's loop as written / raw batch-{small} step, median "
            f"of {count} rounds: the most simmer / book as written at 1 stream could reach",
            written_missing,
        ),
        report.ratio(
            f"simmer / book as written, {config.long_concurrent} concurrent",
            median("simmer_book_written_concurrent"),
            100.0,
            ">=",
            f"the book's generator predicts one prefix per call: {config.long_concurrent} "
            "streams are that many batch-1 re-runs per token step, the tokens/s of one stream "
            f"(book_as_written_batching: one batched call instead); median of {count} rounds",
            written_missing,
        ),
        report.ratio(
            "decode step with / without a scorer loaded",
            scorer.get("ratio"),
            1.1,
            "<=",
            f"raw decode step ({scorer.get('clock')}) at batch {small} and {large} with the "
            f"{SEQUENCE_LOGPROBS} scorer opened and warmed vs none, median of "
            f"{scorer.get('rounds')} alternating rounds; the larger of the two ratios",
            scorer.get("error", "the decode step was not measured"),
        ),
        report.ratio(
            "memory store bytes/session",
            result["sessions"]["memory"]["bytes_per_session"],
            2048,
            "<=",
            f"tracemalloc over {config.sessions:,} sessions",
            "the memory store was not measured",
        ),
        report.ratio(
            "Redis bytes/session",
            redis.get("bytes_per_session"),
            2048,
            "<=",
            f"used_memory delta over {config.sessions:,} sessions",
            redis.get("error", "no Redis to measure (--redis-url is empty)"),
        ),
        report.ratio(
            "metrics on / off throughput",
            result["metrics_overhead"]["ratio"],
            0.95,
            ">=",
            f"best of {config.metrics_rounds} rounds each, {config.metrics_streams} streams",
            "the metrics-off server's tokens/s was 0",
        ),
    ]


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None, so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _realistic_bundle(args: argparse.Namespace, config: BenchConfig) -> RealisticBundle | str:
    """The realistic run's model: the one given, or one trained (or found in the cache);
    without a corpus to train on, the reason the run is skipped."""
    if args.no_realistic:
        return "skipped with --no-realistic"
    if args.realistic_bundle is not None:
        return RealisticBundle(args.realistic_bundle, "given with --realistic-bundle")
    data = args.realistic_data or REALISTIC_DATA
    if not data.is_file():
        return f"no corpus to train the realistic run's model on: {data} is missing"
    preset, epochs, limit = (
        config.realistic_preset,
        config.realistic_epochs,
        config.realistic_max_recipes,
    )
    log(f"training or reusing the realistic run's model: {epochs} epoch(s) of {preset}")
    path = trained_bundle(args.cache / "bench-bundles", data, preset, epochs, limit)
    recipes = "every recipe" if limit is None else f"the first {limit} recipes"
    return RealisticBundle(path, f"{epochs} epoch(s) of the {preset} preset on {recipes} of {data}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/bench.json"))
    parser.add_argument("--bundle", type=Path, help="bundle to serve (default: random book-size)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "simmer",
        help="where the random bundle is kept",
    )
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/15",
        help="Redis for the memory figure; '' skips it",
    )
    parser.add_argument(
        "--threads", type=int, help="server intra-op threads (default: its setting)"
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        help="serve the random model's int8 export (needs --data for the export's loss check)",
    )
    parser.add_argument("--data", type=Path, help="corpus for --quantize int8's loss check")
    parser.add_argument("--smoke", action="store_true", help="every part at tiny sizes")
    which = parser.add_mutually_exclusive_group()  # the realistic run's model
    which.add_argument(
        "--realistic-data",
        type=Path,
        metavar="PATH",
        help=f"corpus the realistic run's model is trained on (default {REALISTIC_DATA})",
    )
    which.add_argument(
        "--realistic-bundle",
        type=Path,
        metavar="DIR",
        help="serve this bundle in the realistic run instead",
    )
    which.add_argument("--no-realistic", action="store_true", help="skip the realistic run")
    args = parser.parse_args(argv)
    if args.realistic_bundle is not None and not is_bundle(args.realistic_bundle):
        parser.error(f"--realistic-bundle {args.realistic_bundle} is not a bundle")
    if args.quantize and args.bundle is not None:
        parser.error("--quantize builds its own bundle; leave out --bundle")
    if args.quantize and (args.data is None or not args.data.exists()):
        parser.error("--quantize int8 needs --data PATH, a recipe corpus the export can read")
    config = BenchConfig.smoke() if args.smoke else BenchConfig()
    bundle = args.bundle
    if bundle is None:
        log(f"building or reusing a random bundle under {args.cache}")
        try:
            bundle = cached_bundle(
                args.cache / "bench-bundles",
                config.vocab_size,
                config.embedding_dim,
                config.hidden_size,
                int8_data=args.data if args.quantize else None,
            )
        except ValueError as exc:  # export's ExportError: a corpus it cannot use, say
            print(f"python -m bench: cannot build the bundle: {exc}", file=sys.stderr)
            return 2
    try:
        realistic = _realistic_bundle(args, config)
    except TrainedBundleError as exc:
        print(f"python -m bench: cannot build the realistic run's bundle: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = run(config, bundle, args.out, args.redis_url or None, args.threads, realistic)
    args.out.write_text(json.dumps(_finite(result), indent=2, allow_nan=False) + "\n")
    png = args.out.with_suffix(".png")
    report.chart(result, png)
    print(report.summary(result))
    print(f"\nwrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
