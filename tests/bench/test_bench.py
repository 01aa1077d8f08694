"""`python -m bench --smoke` runs every part of the benchmark and writes well-formed output.

Nothing here depends on a timing: at smoke sizes a figure may be too small to measure
(the server's CPU time can round to 0 clock ticks), so a ratio is checked for its form,
a finite float or None with a reason, never for its value.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import engine as raw
from bench import trained
from bench.__main__ import (
    WORKER_COST,
    BenchConfig,
    _bare_ceiling,
    _figures,
    _fixed_cost_ceiling,
    _realistic,
    _realistic_bundle,
    _realistic_round,
    _round,
    ratios,
)
from bench.load import LoadSpec
from bench.model import NEWEST_GRAPHS, is_current
from bench.report import quotient, ratio
from bench.server import run_load
from bench.trained import TrainedBundleError, trained_bundle
from harness.server import ServiceProcess
from training import presets

ROOT = Path(__file__).resolve().parents[2]


def _strict_json(text: str) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"not standard JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def assert_well_formed(item: dict[str, Any]) -> None:
    """A finite float with no reason, or None with a reason; met only for a measured value."""
    assert set(item) == {"name", "value", "reason", "target", "better", "met", "how"}, item
    if item["value"] is None:
        assert isinstance(item["reason"], str) and item["reason"], item
        assert item["met"] is None, item
    else:
        assert isinstance(item["value"], float) and math.isfinite(item["value"]), item
        assert item["reason"] is None, item
        assert item["met"] in ((True, False) if item["target"] is not None else (None,)), item


REALISTIC = "CPU efficiency, realistic load (trained model, a connection per generation)"


def test_smoke_run_writes_json_chart_and_summary(
    tmp_path: Path, redis_url: str, epicurious_path: Path
) -> None:
    out = tmp_path / "results" / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--out",
            str(out),
            "--cache",
            str(tmp_path),
            "--redis-url",
            redis_url,
            "--realistic-data",
            str(epicurious_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = _strict_json(out.read_text())

    assert {row["batch"] for row in result["engine"]["table"]} == set(result["config"]["batches"])
    for name, run in result["server"].items():
        assert run["tokens"] > 0, name
        assert run["errors"] == 0, name
        assert run["ttft_ms"]["p50"] >= 0, name
    assert result["book"]["tokens"] > 0
    # the book as written, on the every-position graph, and one batched call against many
    assert result["book_as_written"]["tokens"] > 0
    assert result["book_as_written"]["graph"].startswith("sequence_logprobs.onnx")
    batching = result["book_as_written_batching"]
    assert batching["streams"] == result["config"]["long_concurrent"]
    assert batching["one_call_ms"] > 0 and batching["separate_calls_ms"] > 0
    assert all(r["book_written_tokens_per_s"] > 0 for r in result["headline_rounds"])
    # the decode step beside a loaded scorer, at the smallest and largest stream counts
    scorer = result["decode_with_scorer"]
    assert set(scorer["batches"]) == {
        str(min(result["config"]["ws_streams"])),
        str(max(result["config"]["ws_streams"])),
    }
    for figure in scorer["batches"].values():
        assert figure["step_ms_without"] > 0 and figure["step_ms_with"] > 0
    assert result["sessions"]["memory"]["sessions"] == result["config"]["sessions"]
    assert result["sessions"]["redis"]["sessions"] == result["config"]["sessions"]
    # every key the measurement wrote is gone again: each session's record and its
    # expiry marker (one slot per session, no global index)
    assert result["sessions"]["redis"]["keys_deleted"] == 2 * result["config"]["sessions"]
    by_name = {r["name"]: r for r in result["ratios"]}
    assert len(by_name) == len(result["ratios"]) == 24
    # decode_run at batch 1 against the raw step, in the same process
    floor = result["itl_floor"]
    assert floor["steps_per_run"] >= 2 and floor["rounds"] == result["config"]["ceiling_rounds"]
    assert floor["floor"] == pytest.approx(floor["run_step_ms"] / floor["raw_step_ms"])
    # the engine with the server's sampler, for both models: a sampled step costs more
    for ceiling in (result["sampling_ceiling"], result["realistic"]["sampling_ceiling"]):
        assert ceiling["sampled_cpu_per_token_us"] > 0 and ceiling["raw_cpu_per_token_us"] > 0
        assert ceiling["ceiling"] == pytest.approx(
            ceiling["raw_cpu_per_token_us"] / ceiling["sampled_cpu_per_token_us"]
        )
    # each generation's fixed cost: one-token generations on kept and on new connections
    for fixed in (result["sampling_ceiling"], result["realistic"]):
        assert fixed["one_token"]["errors"] == 0
        assert fixed["one_token"]["generations"] > 0
        assert fixed["one_token"]["rounds"] == result["config"]["ceiling_rounds"]
        assert fixed["tokens_per_generation"] > 0
        # the bare protocol server under the same load, in the rounds asked: never more
        # token messages a generation than the server sent
        bare = fixed["bare_server"]
        assert bare["rounds"] == result["config"]["ceiling_rounds"]
        assert (
            1 <= bare["messages_per_generation"] <= max(1, bare["server_messages_per_generation"])
        )
    # the realistic load: a tiny trained bundle, every generation on a connection of its own
    config, realistic = result["config"], result["realistic"]
    assert realistic["bundle"]["trained"].startswith("1 epoch(s) of the tiny preset")
    assert Path(realistic["bundle"]["path"]).name.startswith("trained-")
    assert len(realistic["rounds"]) == config["headline_rounds"]
    for r in realistic["rounds"]:
        assert r["tokens"] > 0
        assert r["errors"] == 0, r["error_examples"]
        assert r["connect_ms"]["n"] == config["realistic_streams"] * config["realistic_requests"]
        assert sum(r["finish_reasons"].values()) == r["connect_ms"]["n"]
    assert by_name[REALISTIC]["reason"] != "the realistic load was not run"
    # the same load on the engine core alone, beside the raw step: every client's
    # generations ended, within the token limit, at batches no larger than the clients
    core = realistic["engine_core"]
    assert core["rounds"] == config["ceiling_rounds"]
    assert core["raw_cpu_per_token_us"] > 0
    # the engine's side is part of the process
    assert 0 < core["worker_cpu_per_token_us"] < core["core_cpu_per_token_us"]
    assert core["ceiling"] == pytest.approx(
        core["raw_cpu_per_token_us"] / core["worker_cpu_per_token_us"]
    )
    assert 0 < core["tokens_per_generation"] <= config["tokens"]
    assert 1 <= core["mean_batch"] <= config["realistic_streams"]
    bare_cpu = realistic["bare_server"]["cpu_per_token_us"]
    if bare_cpu is not None:  # None below one clock tick
        assert realistic["ceiling_engine_core_with_bare_server"] < core["ceiling"]
    assert "the engine core alone under this load" in proc.stdout
    choices = result["choices"]
    assert choices["n"] == result["config"]["choices"]
    assert choices["seconds_median"]["n"] > 0 and choices["seconds_median"]["separate"] > 0
    records = result["sessions"]["record_bytes"]
    assert records["8_rewind_points"] > records["no_rewind_points"] > 0
    assert records["state_token"] > records["no_rewind_points"]
    for item in result["ratios"]:
        assert_well_formed(item)
    assert by_name["Redis bytes/session"]["value"] is not None  # the Redis was there
    for name in (
        "simmer / book as written, 1 stream",
        f"simmer / book as written, {result['config']['long_concurrent']} concurrent",
        "simmer / book, last position only, 1 stream",
        "decode step with / without a scorer loaded",
    ):
        assert by_name[name]["value"] is not None, name  # measured, whatever its value

    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ratios" in proc.stdout
    assert "as written" in proc.stdout
    assert "decode step without / with a scorer loaded" in proc.stdout
    assert "realistic load (trained model, a connection per generation)" in proc.stdout
    assert str(out) in proc.stdout


@pytest.mark.parametrize(
    ("numerator", "denominator", "expected"),
    [
        (3.0, 2.0, 1.5),
        (0.0, 2.0, 0.0),
        (3.0, 0.0, None),
        (3.0, None, None),
        (None, 2.0, None),
        (math.nan, 2.0, None),
        (3.0, math.inf, None),
    ],
)
def test_quotient_is_none_where_a_figure_is_missing_or_the_denominator_is_zero(
    numerator: float | None, denominator: float | None, expected: float | None
) -> None:
    assert quotient(numerator, denominator) == expected


@pytest.mark.parametrize("value", [None, math.nan, math.inf])
def test_an_unmeasured_ratio_is_none_with_its_reason_and_no_verdict(value: float | None) -> None:
    item = ratio("x", value, 1.0, ">=", "how it is measured", "why it is missing")
    assert_well_formed(item)
    assert (item["value"], item["reason"], item["met"]) == (None, "why it is missing", None)


def test_a_measured_ratio_is_a_float_with_a_verdict_and_no_reason() -> None:
    item = ratio("x", 2, 1.0, ">=", "how it is measured", "why it is missing")
    assert_well_formed(item)
    assert (item["value"], item["reason"], item["met"]) == (2.0, None, True)
    assert ratio("x", 2.0, 1.0, "<=", "how", "why")["met"] is False


def load_figures(cpu_seconds: float) -> dict[str, Any]:
    """A load run as run_load reports it, with the server's CPU time given."""
    tokens = 64
    return _figures(
        {
            "protocol": "ws",
            "streams": 4,
            "requests": 1,
            "max_tokens": 16,
            "tokens": tokens,
            "wall_s": 0.5,
            "tokens_per_s": 128.0,
            "server_cpu_s": cpu_seconds,
            "server_cpu_per_token_s": cpu_seconds / tokens,
            "server_cpu_utilisation": cpu_seconds / 0.5,
            "ttft_s": {"p50": 0.01, "p99": 0.02},
            "itl_s": {"p50": None, "p99": None},
            "request_latency_s": {"p50": 0.1, "p99": 0.2},
            "connect_s": {"p50": None, "p99": None, "mean": None, "n": 0},
            "tokens_per_message": 16.0,
            "token_messages": 4,
            "finish_reasons": {"length": 4},
            "error_count": 0,
            "errors": [],
        }
    )


def test_zero_server_clock_ticks_give_no_cpu_efficiency_and_say_why() -> None:
    """The flake this file once had: a smoke run's server CPU time rounded to 0 ticks."""
    config = BenchConfig.smoke()
    idle = load_figures(0.0)
    assert idle["server_cpu_per_token_us"] is None
    raw = {"step_ms": 0.1, "cpu_per_token_us": 20.0, "tokens_per_s": 5000.0}
    book = {"tokens_per_s": 100.0}
    written = {"tokens_per_s": 4.0}
    rounds = [
        _round(raw, idle, raw, idle, book, written, idle, idle)
        for _ in range(config.headline_rounds)
    ]
    assert {r["cpu_efficiency"] for r in rounds} == {None}
    assert {r["itl_ratio"] for r in rounds} == {None}  # every token came in one message
    result = {
        "headline_rounds": rounds,
        "history": {"ratio": 1.0},
        "simmer_long": {str(config.long_concurrent): idle},
        "sessions": {"memory": {"bytes_per_session": 500.0}, "redis": {"error": "no Redis"}},
        "metrics_overhead": {"ratio": 1.0},
    }
    items = {r["name"]: r for r in ratios(result, config)}
    for item in items.values():
        assert_well_formed(item)
    efficiency = items[f"CPU efficiency at {config.large} streams"]
    assert efficiency["value"] is None
    assert "0 clock ticks" in efficiency["reason"]
    assert items["Redis bytes/session"]["reason"] == "no Redis"
    assert items["simmer / book, last position only, 1 stream"]["value"] == pytest.approx(1.28)
    assert items["simmer / book as written, 1 stream"]["value"] == pytest.approx(32.0)
    scorer = items["decode step with / without a scorer loaded"]
    assert scorer["value"] is None and scorer["reason"] == "the decode step was not measured"


def test_a_measured_server_cpu_time_gives_a_cpu_efficiency() -> None:
    busy = load_figures(0.064)  # 1 ms per token
    raw = {"step_ms": 0.1, "cpu_per_token_us": 500.0, "tokens_per_s": 5000.0}
    figures = _round(
        raw, busy, raw, busy, {"tokens_per_s": 100.0}, {"tokens_per_s": 2.0}, busy, busy
    )
    assert figures["cpu_efficiency"] == pytest.approx(0.5)
    assert figures["simmer_book_written_single"] == pytest.approx(64.0)


def test_the_concurrent_ratios_are_the_median_of_the_rounds() -> None:
    """Each headline round serves its own concurrent load: one slow round (a burst from
    elsewhere on the machine) does not decide the figure."""
    config = BenchConfig.smoke()
    raw = {"step_ms": 0.1, "cpu_per_token_us": 500.0, "tokens_per_s": 5000.0}
    busy = load_figures(0.064)
    rounds = []
    for concurrent in (640.0, 100.0, 400.0):  # 320x, 50x and 200x the book as written
        served = {**busy, "tokens_per_s": concurrent}
        book, written = {"tokens_per_s": 10.0}, {"tokens_per_s": 2.0}
        rounds.append(_round(raw, busy, raw, busy, book, written, busy, served))
    assert [r["simmer_book_written_concurrent"] for r in rounds] == [320.0, 50.0, 200.0]
    result = {
        **one_round_result(config, raw, busy),
        "headline_rounds": rounds,
        "book_as_written": {"tokens_per_s": 2.0},
    }
    items = {r["name"]: r for r in ratios(result, config)}
    written = items[f"simmer / book as written, {config.long_concurrent} concurrent"]
    assert written["value"] == pytest.approx(200.0)
    last = items[f"simmer / book, last position only, {config.long_concurrent} concurrent"]
    assert last["value"] == pytest.approx(40.0)


def test_a_bundle_without_the_scoring_graph_gives_no_book_as_written_figure_and_says_why() -> None:
    config = BenchConfig.smoke()
    figures = load_figures(0.064)
    raw = {"step_ms": 0.1, "cpu_per_token_us": 500.0, "tokens_per_s": 5000.0}
    missing = {"error": "the bundle has no sequence_logprobs graph"}
    rounds = [
        _round(raw, figures, raw, figures, {"tokens_per_s": 100.0}, missing, figures, figures)
    ]
    assert rounds[0]["simmer_book_written_single"] is None
    result = {
        "headline_rounds": rounds,
        "history": {"ratio": 1.0},
        "simmer_long": {str(config.long_concurrent): figures},
        "sessions": {"memory": {"bytes_per_session": 500.0}, "redis": {"error": "no Redis"}},
        "metrics_overhead": {"ratio": 1.0},
        "book_as_written": missing,
        "decode_with_scorer": missing,
    }
    items = {r["name"]: r for r in ratios(result, config)}
    for name in (
        "simmer / book as written, 1 stream",
        f"simmer / book as written, {config.long_concurrent} concurrent",
        "decode step with / without a scorer loaded",
    ):
        assert_well_formed(items[name])
        assert items[name]["reason"] == missing["error"], name


def one_round_result(
    config: BenchConfig, raw: dict[str, float], busy: dict[str, Any]
) -> dict[str, Any]:
    """A result with one headline round of `raw` against `busy` and every other part a
    stand-in, for the ratios."""
    return {
        "headline_rounds": [_round(raw, busy, raw, busy, {"tokens_per_s": 100.0}, {}, busy, busy)],
        "history": {"ratio": 1.0},
        "simmer_long": {str(config.long_concurrent): busy},
        "sessions": {"memory": {"bytes_per_session": 500.0}, "redis": {"error": "no Redis"}},
        "metrics_overhead": {"ratio": 1.0},
    }


def test_the_realistic_efficiency_is_the_median_of_its_rounds_or_says_why_it_is_missing() -> None:
    config = BenchConfig.smoke()
    raw = {"step_ms": 0.1, "cpu_per_token_us": 500.0, "tokens_per_s": 5000.0}
    busy, idle = load_figures(0.064), load_figures(0.0)  # 1 ms per token; 0 clock ticks
    base = one_round_result(config, raw, busy)
    rounds = [_realistic_round(raw, figures) for figures in (busy, idle, busy)]
    assert [r["cpu_efficiency"] for r in rounds] == [0.5, None, 0.5]
    measured = {r["name"]: r for r in ratios({**base, "realistic": {"rounds": rounds}}, config)}
    assert measured[REALISTIC]["value"] == pytest.approx(0.5)
    assert measured[REALISTIC]["met"] is False  # the target is 0.6
    unmeasured = ratios({**base, "realistic": {"rounds": rounds[1:2]}}, config)
    assert "0 clock ticks" in {r["name"]: r for r in unmeasured}[REALISTIC]["reason"]
    skipped = {"skipped": "no corpus to train the realistic run's model on"}
    items = {r["name"]: r for r in ratios({**base, "realistic": skipped}, config)}
    assert_well_formed(items[REALISTIC])
    assert items[REALISTIC]["reason"] == skipped["skipped"]


def test_the_fixed_cost_ceiling_adds_each_generations_fixed_cost_to_the_sampled_step() -> None:
    ceiling = {"raw_cpu_per_token_us": 18.0, "sampled_cpu_per_token_us": 24.0}
    # 624 us a generation, less its one sampled step, over 50 tokens: 18 / (24 + 600 / 50)
    assert _fixed_cost_ceiling(ceiling, 624.0, 50.0) == pytest.approx(0.5)
    # a generation that cost less than a sampled step adds nothing
    assert _fixed_cost_ceiling(ceiling, 10.0, 50.0) == pytest.approx(0.75)
    assert _fixed_cost_ceiling(ceiling, None, 50.0) is None  # 0 clock ticks
    assert _fixed_cost_ceiling(ceiling, 600.0, None) is None
    assert _fixed_cost_ceiling({"error": "no sampling graphs"}, 600.0, 50.0) is None


def test_the_one_token_cost_is_the_median_cpu_per_ended_generation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rounds below a clock tick are left out of the median; generations that failed are
    not counted as served."""
    import bench.__main__ as main

    runs = iter(
        [
            {"server_cpu_s": 0.02, "finish_reasons": {"length": 90, "eos": 10}, "error_count": 0},
            {"server_cpu_s": 0.0, "finish_reasons": {"length": 100}, "error_count": 0},
            {"server_cpu_s": 0.03, "finish_reasons": {"length": 75}, "error_count": 25},
        ]
    )
    specs: list[LoadSpec] = []

    def fake_run_load(server: Any, spec: LoadSpec) -> dict[str, Any]:
        specs.append(spec)
        return next(runs)

    monkeypatch.setattr(main, "run_load", fake_run_load)
    spec = LoadSpec(url="ws://127.0.0.1:1/v1/stream", streams=100, max_tokens=64)
    cost = main._one_token_cost(None, spec, 3)  # type: ignore[arg-type]
    assert {s.max_tokens for s in specs} == {1} and spec.max_tokens == 64
    # 200 us and 400 us per generation that ended; the 0-tick round is not measured
    assert cost == {"rounds": 3, "generations": 275, "cpu_per_generation_us": 300.0, "errors": 25}
    idle = iter([{"server_cpu_s": 0.0, "finish_reasons": {"length": 1}, "error_count": 0}] * 2)
    monkeypatch.setattr(main, "run_load", lambda server, spec: next(idle))
    assert main._one_token_cost(None, spec, 2)["cpu_per_generation_us"] is None  # type: ignore[arg-type]


def test_the_bare_server_ceiling_adds_its_cpu_per_token_to_the_sampled_step() -> None:
    ceiling = {"raw_cpu_per_token_us": 18.0, "sampled_cpu_per_token_us": 24.0}
    assert _bare_ceiling(ceiling, 6.0) == pytest.approx(0.6)
    assert _bare_ceiling(ceiling, 0.0) == pytest.approx(0.75)
    assert _bare_ceiling(ceiling, None) is None  # 0 clock ticks
    assert _bare_ceiling({"error": "no sampling graphs"}, 6.0) is None


def test_the_engine_core_ceiling_adds_the_bare_servers_cpu_per_token_to_the_workers() -> None:
    core = {"raw_cpu_per_token_us": 45.0, "worker_cpu_per_token_us": 90.0, "ceiling": 0.5}
    assert _bare_ceiling(core, 0.0, WORKER_COST) == pytest.approx(0.5)
    assert _bare_ceiling(core, 10.0, WORKER_COST) == pytest.approx(0.45)
    assert _bare_ceiling(core, None, WORKER_COST) is None  # 0 clock ticks


def _core_load(streams: int = 3) -> raw.CoreLoad:
    return raw.CoreLoad(
        streams=streams,
        requests=2,
        max_tokens=5,
        prompt="recipe for soup",
        max_batch=8,
        max_stride=16,
        decode_runs=True,
        ban_unk=True,
    )


def test_the_engine_core_runs_the_load_and_its_side_is_part_of_the_process(
    tiny_bundle: Path,
) -> None:
    core = raw.engine_core_load(tiny_bundle, 1, 8, 0.05, 2, _core_load())
    assert core["rounds"] == 2
    assert 0 < core["worker_cpu_per_token_us"] < core["core_cpu_per_token_us"]
    assert 0 < core["tokens_per_generation"] <= 5
    assert 1 <= core["mean_batch"] <= 3  # never more rows than clients


def test_an_engine_core_that_fails_its_generations_is_reported_not_raised(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.engine.runner import ModelRunner

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected step fault")

    for name in ("execute", "execute_run"):  # every step the worker takes fails
        monkeypatch.setattr(ModelRunner, name, broken)
    core = raw.engine_core_load(tiny_bundle, 1, 8, 0.05, 2, _core_load())
    assert set(core) == {"error"}
    assert core["error"].startswith("the engine core ended ")
    assert "otherwise than by eos or length (error)" in core["error"]
    assert _bare_ceiling(core, 1.0, WORKER_COST) is None


@pytest.mark.parametrize(
    ("messages", "max_tokens", "sent"), [(1, 1, 1), (3, 7, 3), (6, 64, 6), (7, 64, 7), (64, 5, 5)]
)
def test_the_bare_server_speaks_the_stream_protocol_in_at_most_the_messages_asked(
    tmp_path: Path, messages: int, max_tokens: int, sent: int
) -> None:
    settings = {"bare_messages": str(messages)}
    with ServiceProcess(tmp_path, tmp_path / "bare.log", "bench.bare", **settings) as server:
        for reconnect in (False, True):
            spec = LoadSpec(
                url=server.ws_url, streams=3, requests=2, max_tokens=max_tokens, reconnect=reconnect
            )
            run = run_load(server, spec)
            assert run["error_count"] == 0, run["errors"]
            assert run["tokens"] == run["tokens_received"] == 6 * max_tokens
            assert run["token_messages"] == 6 * sent
            assert run["finish_reasons"] == {"length": 6}


def test_the_bare_server_refuses_a_message_count_below_one(tmp_path: Path) -> None:
    env = {**os.environ, "SIMMER_BARE_MESSAGES": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bare"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: SIMMER_BARE_MESSAGES must be a whole number >= 1"


def test_the_ceilings_are_reported_without_a_target_or_say_why_they_are_missing() -> None:
    config = BenchConfig.smoke()
    raw = {"step_ms": 0.1, "cpu_per_token_us": 500.0, "tokens_per_s": 5000.0}
    busy = load_figures(0.064)
    base = one_round_result(config, raw, busy)
    headline = f"CPU efficiency ceiling at {config.large} streams: the model and its sampler alone"
    fixed = (
        f"CPU efficiency ceiling at {config.large} streams: the model, its sampler and each "
        "generation's fixed cost"
    )
    realistic = (
        "CPU efficiency ceiling, realistic load: the model, its sampler and each "
        "generation's fixed cost"
    )
    floor = "inter-token latency floor at 1 stream: the decode_run graph's own step"
    bare = (
        f"CPU efficiency ceiling at {config.large} streams: the model, its sampler and a bare "
        "protocol server"
    )
    realistic_bare = (
        "CPU efficiency ceiling, realistic load: the model, its sampler and a bare protocol server"
    )
    core = "CPU efficiency ceiling, realistic load: the engine core's worker alone"
    core_bare = (
        "CPU efficiency ceiling, realistic load: the engine core's worker and a bare protocol "
        "server"
    )
    measured = {
        **base,
        "sampling_ceiling": {
            "ceiling": 0.75,
            "rounds": 2,
            "ceiling_with_fixed_cost": 0.7,
            "ceiling_with_bare_server": 0.72,
        },
        "realistic": {
            "rounds": [],
            "ceiling_with_fixed_cost": 0.5,
            "ceiling_with_bare_server": 0.6,
            "engine_core": {"ceiling": 0.5},
            "ceiling_engine_core_with_bare_server": 0.45,
        },
        "itl_floor": {"floor": 1.2, "rounds": 2},
    }
    items = {r["name"]: r for r in ratios(measured, config)}
    assert items[headline]["value"] == 0.75
    assert items[fixed]["value"] == 0.7
    assert items[realistic]["value"] == 0.5
    assert items[floor]["value"] == 1.2
    assert items[bare]["value"] == 0.72
    assert items[realistic_bare]["value"] == 0.6
    assert items[core]["value"] == 0.5
    assert items[core_bare]["value"] == 0.45
    for name in (headline, fixed, realistic, floor, bare, realistic_bare, core, core_bare):
        assert_well_formed(items[name])
        assert items[name]["target"] is None and items[name]["met"] is None
    missing = {r["name"]: r for r in ratios(base, config)}
    assert missing[headline]["reason"] == "the engine with its sampler was not run"
    assert missing[fixed]["reason"] == "the engine with its sampler was not run"
    assert missing[realistic]["reason"] == "the realistic load was not run"
    assert missing[bare]["reason"] == "the engine with its sampler was not run"
    assert missing[realistic_bare]["reason"] == "the realistic load was not run"
    assert missing[core]["reason"] == "the realistic load was not run"
    assert missing[core_bare]["reason"] == "the realistic load was not run"
    assert missing[floor]["reason"] == "the decode_run graph's step was not measured"
    no_graph = {**base, "itl_floor": {"error": "the bundle has no decode_run graph"}}
    no_run = {r["name"]: r for r in ratios(no_graph, config)}
    assert no_run[floor]["reason"] == "the bundle has no decode_run graph"


def fake_modules(
    monkeypatch: pytest.MonkeyPatch, graphs: tuple[str, ...] = NEWEST_GRAPHS
) -> list[str]:
    """Replace the training and export processes with stand-ins that record their module
    and leave what each would leave: a run folder, a bundle with its manifest (listing
    `graphs`)."""
    ran: list[str] = []

    def run_module(module: str, args: list[str]) -> None:
        ran.append(module)
        out = Path(args[args.index("--out") + 1])
        out.mkdir()
        if module == "export":
            manifest: dict[str, Any] = {"graphs": {name: {} for name in graphs}}
            (out / "manifest.json").write_text(json.dumps(manifest))

    monkeypatch.setattr(trained, "_run_module", run_module)
    return ran


def test_a_trained_bundle_is_reused_from_the_cache_without_training_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = fake_modules(monkeypatch)
    corpus = tmp_path / "recipes.json"
    corpus.write_text("[]")
    cache = tmp_path / "cache"
    first = trained_bundle(cache, corpus, "tiny", 1, 200)
    assert ran == ["training", "export"]
    inode = first.stat().st_ino
    again = trained_bundle(cache, corpus, "tiny", 1, 200)
    assert (again, again.stat().st_ino, ran) == (first, inode, ["training", "export"])
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temporary folder left
    # another recipe limit, or another corpus, is another model
    assert trained_bundle(cache, corpus, "tiny", 1, 100) != first
    corpus.write_text("[ ]")
    second = trained_bundle(cache, corpus, "tiny", 1, 200)
    assert second != first
    # so is the same preset name with other settings
    changed = {**presets.PRESETS, "tiny": presets.get_preset("tiny").with_overrides(lr=1e-4)}
    monkeypatch.setattr(presets, "PRESETS", changed)
    assert trained_bundle(cache, corpus, "tiny", 1, 200) != second
    assert ran == ["training", "export"] * 4


def test_a_trained_bundle_from_an_older_export_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached bundle without a graph the export now builds (decode_run, say) would
    measure an older service: it is trained and exported again, in its place."""
    corpus = tmp_path / "recipes.json"
    corpus.write_text("[]")
    cache = tmp_path / "cache"
    ran = fake_modules(monkeypatch, graphs=NEWEST_GRAPHS[:-1])
    older = trained_bundle(cache, corpus, "tiny", 1, 200)
    assert not is_current(older)
    ran = fake_modules(monkeypatch)
    again = trained_bundle(cache, corpus, "tiny", 1, 200)
    assert again == older and is_current(again)
    assert ran == ["training", "export"]
    assert [p.name for p in cache.iterdir()] == [again.name]


def test_a_failed_training_raises_with_its_output_and_leaves_nothing_to_reuse(
    tmp_path: Path,
) -> None:
    corpus = tmp_path / "recipes.json"
    corpus.write_text("this is not a recipe corpus")
    cache = tmp_path / "cache"
    with pytest.raises(TrainedBundleError, match="python -m training") as failure:
        trained_bundle(cache, corpus, "tiny", 1, 200)
    assert "error:" in str(failure.value)  # the training CLI's own one-line message
    assert list(cache.iterdir()) == []


def test_without_its_corpus_the_realistic_run_is_skipped_and_says_why(tmp_path: Path) -> None:
    config = BenchConfig.smoke()
    missing = tmp_path / "no-such-corpus.json"
    args = argparse.Namespace(
        no_realistic=False, realistic_bundle=None, realistic_data=missing, cache=tmp_path
    )
    reason = _realistic_bundle(args, config)
    assert isinstance(reason, str) and str(missing) in reason
    assert _realistic(reason, config, 1, {}, tmp_path) == {"skipped": reason}
    assert not (tmp_path / "bench-bundles").exists()  # nothing was trained
