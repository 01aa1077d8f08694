"""The benchmark's outputs: the ratios against their targets, a chart and a summary."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any


def quotient(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator; None when either is missing or not finite, or the
    denominator is 0 (say a CPU time that rounded to 0 clock ticks)."""
    if numerator is None or denominator is None:
        return None
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator == 0:
        return None
    return numerator / denominator


def ratio(
    name: str,
    value: float | None,
    target: float | None,
    better: str,
    how: str,
    missing: str,
) -> dict[str, Any]:
    """One headline figure; `better` is ">=" or "<=" (the target's side), or "" for none.

    A figure that could not be measured has value None and `missing` as its reason;
    a measured one has a finite float value and reason None.
    """
    if value is not None:
        value = float(value) if math.isfinite(value) else None
    met = None
    if target is not None and value is not None:
        met = value >= target if better == ">=" else value <= target
    return {
        "name": name,
        "value": value,
        "reason": None if value is not None else missing,
        "target": target,
        "better": better,
        "met": met,
        "how": how,
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def summary(result: dict[str, Any]) -> str:
    """A readable summary of one run."""
    lines = [f"simmer benchmark: {result['bundle']['description']}"]
    lines.append(f"  machine: {result['machine']['cpus']} CPUs, {result['machine']['cpu_model']}")
    lines.append(
        f"  server: intra-op threads {result['server_settings']['intra_op_threads']}, "
        f"max batch {result['server_settings']['max_batch']}"
    )
    lines.append("")
    lines.append("raw engine (threads, batch: tokens/s, step ms, CPU us/token)")
    for row in result["engine"]["table"]:
        lines.append(
            f"  {row['threads']} x {row['batch']:>3}: {row['tokens_per_s']:>9,.0f} tok/s  "
            f"{row['step_ms']:7.3f} ms  {row['cpu_per_token_us']:7.1f} us"
        )
    lines.append("")
    lines.append(
        "server (streams: tokens/s, CPU us/token, TTFT p50/p99 ms, ITL p50/p99 ms, tok/msg)"
    )
    for label, run in result["server"].items():
        lines.append(
            f"  {label:>7}: {run['tokens_per_s']:>9,.0f} tok/s  "
            f"{_fmt(run['server_cpu_per_token_us'], 1):>7} us  "
            f"TTFT {_fmt(run['ttft_ms']['p50'])}/{_fmt(run['ttft_ms']['p99'])}  "
            f"ITL {_fmt(run['itl_ms']['p50'], 3)}/{_fmt(run['itl_ms']['p99'], 3)}  "
            f"{run['tokens_per_message']:.2f}"
        )
    lines.extend(_book_lines(result))
    rounds = result.get("headline_rounds", [])
    if rounds:
        lines.append("")
        lines.append("headline rounds (raw engine and server side by side; ratios use the median)")
        for i, r in enumerate(rounds, 1):
            raw_cpu, server_cpu = (
                r["raw_cpu_per_token_us_large"],
                r["server_cpu_per_token_us_large"],
            )
            lines.append(
                f"  {i}: ITL {_fmt(r['itl_ms_p50_small'], 3)} ms / raw step "
                f"{_fmt(r['raw_step_ms_small'], 3)} ms = {_fmt(r['itl_ratio'])};  CPU "
                f"{_fmt(raw_cpu, 1)} / {_fmt(server_cpu, 1)} us = {_fmt(r['cpu_efficiency'], 3)};"
                f"  simmer/book 1 stream {_fmt(r['simmer_single_tokens_per_s'], 0)} / "
                f"{_fmt(r['book_tokens_per_s'], 0)} = {_fmt(r['simmer_book_single'])}, "
                f"as written {_fmt(r.get('book_written_tokens_per_s'), 0)} tok/s = "
                f"{_fmt(r.get('simmer_book_written_single'))};  "
                f"concurrent {_fmt(r.get('simmer_concurrent_tokens_per_s'), 0)} tok/s = "
                f"{_fmt(r.get('simmer_book_written_concurrent'))} x as written"
            )
    if "sampling_ceiling" in result:
        lines.append("")
        ceiling = result["sampling_ceiling"]
        lines.extend(_ceiling_lines("engine with the server's sampler", ceiling, ceiling))
    floor = result.get("itl_floor")
    if floor is not None:
        lines.append("")
        if "error" in floor:
            lines.append(f"decode_run at batch 1: not measured ({floor['error']})")
        else:
            lines.append(
                f"decode_run at batch 1 ({floor['steps_per_run']} steps a call, median of "
                f"{floor['rounds']} rounds): {_fmt(floor['run_step_ms'], 3)} ms a step against "
                f"the raw step's {_fmt(floor['raw_step_ms'], 3)}: floor {_fmt(floor['floor'])}"
            )
    lines.extend(_realistic_lines(result.get("realistic", {})))
    lines.append("")
    lines.append("ratios")
    for item in result["ratios"]:
        mark = {True: "met", False: "MISSED", None: "-"}[item["met"]]
        target = "" if item["target"] is None else f" (target {item['better']} {item['target']})"
        why = "" if item["reason"] is None else f" ({item['reason']})"
        lines.append(f"  {item['name']}: {_fmt(item['value'], 3)}{target}  {mark}{why}")
    return "\n".join(lines)


def _book_lines(result: dict[str, Any]) -> list[str]:
    """The book's loop on both graphs, one batched call against separate calls, and the
    decode step beside a loaded scorer."""
    lines = ["", "book-style generation (requests one after another)"]
    for key, label in (("book", "last position only"), ("book_as_written", "as written")):
        run = result.get(key, {})
        if "error" in run or not run:
            lines.append(f"  {label}: not measured ({run.get('error', 'missing')})")
            continue
        lines.append(
            f"  {label}: {run['tokens_per_s']:,.0f} tok/s, "
            f"{run['request_latency_s'] * 1e3:,.1f} ms per {run['max_tokens']}-token request"
        )
    batching = result.get("book_as_written_batching", {})
    if "one_call_ms" in batching:
        lines.append(
            f"  as written, {batching['streams']} prefixes of {batching['prefix_tokens']} "
            f"tokens: one call {batching['one_call_ms']:,.1f} ms, separate calls "
            f"{batching['separate_calls_ms']:,.1f} ms (batching speedup "
            f"{_fmt(batching['batching_speedup'])})"
        )
    scorer = result.get("decode_with_scorer", {})
    if "batches" in scorer:
        lines.append("")
        lines.append("decode step without / with a scorer loaded (ms)")
        for batch, figure in scorer["batches"].items():
            lines.append(
                f"  batch {batch:>3}: {figure['step_ms_without']:.3f} / "
                f"{figure['step_ms_with']:.3f} = {figure['ratio']:.3f}"
            )
    return lines


def _ceiling_lines(
    title: str, ceiling: dict[str, Any], fixed: dict[str, Any], indent: str = ""
) -> list[str]:
    """The raw engine against the same steps sampled by the server's sampling head, and
    with each generation's fixed cost (`fixed`: one_token, tokens_per_generation and
    ceiling_with_fixed_cost) added, and with the bare protocol server's cost (`fixed`'s
    bare_server and ceiling_with_bare_server)."""
    if "error" in ceiling:
        return [f"{indent}{title}: not measured ({ceiling['error']})"]
    one_token, bare = fixed["one_token"], fixed["bare_server"]
    return [
        f"{indent}{title} (batch {ceiling['batch']}, CPU us/token, median of "
        f"{ceiling['rounds']} rounds)",
        f"{indent}  raw {_fmt(ceiling['raw_cpu_per_token_us'], 1)}, sampled "
        f"{_fmt(ceiling['sampled_cpu_per_token_us'], 1)} (sampling "
        f"{_fmt(ceiling['sampling_cpu_per_token_us'], 1)}): ceiling {_fmt(ceiling['ceiling'], 3)}",
        f"{indent}  one-token generations: {_fmt(one_token['cpu_per_generation_us'], 0)} us of "
        f"server CPU each ({one_token['generations']} in {one_token['rounds']} rounds, errors "
        f"{one_token['errors']}); over "
        f"{_fmt(fixed['tokens_per_generation'], 1)} tokens per generation: ceiling "
        f"{_fmt(fixed['ceiling_with_fixed_cost'], 3)}",
        f"{indent}  bare protocol server, {_fmt(bare['messages_per_generation'], 1)} token "
        f"messages a generation (the server: {_fmt(bare['server_messages_per_generation'], 1)}): "
        f"{_fmt(bare['cpu_per_token_us'], 2)} us of CPU per token (median of "
        f"{bare['rounds']} rounds): ceiling {_fmt(fixed['ceiling_with_bare_server'], 3)}",
    ]


def _realistic_lines(realistic: dict[str, Any]) -> list[str]:
    """The realistic load, a line per round like the headline rounds."""
    if not realistic:
        return []
    lines = ["", "realistic load (trained model, a connection per generation)"]
    if "skipped" in realistic:
        return [*lines, f"  skipped: {realistic['skipped']}"]
    lines.append(f"  bundle: {realistic['bundle']['description']}")
    lines.append(f"  trained: {realistic['bundle']['trained']}")
    lines.append(
        f"  {realistic['streams']} clients x {realistic['requests_per_stream']} connections x "
        f"{realistic['max_tokens']} tokens; raw engine at batch {realistic['raw_batch']}"
    )
    for i, r in enumerate(realistic["rounds"], 1):
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["finish_reasons"].items()))
        lines.append(
            f"  {i}: CPU {_fmt(r['raw_cpu_per_token_us'], 1)} / "
            f"{_fmt(r['server_cpu_per_token_us'], 1)} us = {_fmt(r['cpu_efficiency'], 3)};  "
            f"{r['tokens_per_s']:,.0f} tok/s  TTFT {_fmt(r['ttft_ms']['p50'])}/"
            f"{_fmt(r['ttft_ms']['p99'])} ms  connect {_fmt(r['connect_ms']['p50'])} ms  "
            f"{r['tokens_per_message']:.2f} tok/msg  finish {reasons or '-'}  "
            f"errors {r['errors']}"
        )
    lines.extend(
        _ceiling_lines(
            "the realistic model with the server's sampler",
            realistic["sampling_ceiling"],
            realistic,
            "  ",
        )
    )
    core = realistic.get("engine_core")
    if core and "error" in core:
        lines.append(f"  the engine core alone under this load: {core['error']}")
    elif core:
        lines.append(
            f"  the engine core alone under this load (CPU us/token, median of {core['rounds']} "
            f"rounds): raw {_fmt(core['raw_cpu_per_token_us'], 1)}, its worker "
            f"{_fmt(core['worker_cpu_per_token_us'], 1)}, the process "
            f"{_fmt(core['core_cpu_per_token_us'], 1)} ({_fmt(core['tokens_per_generation'], 1)} "
            f"tokens a generation, mean batch {_fmt(core['mean_batch'], 0)}): ceiling "
            f"{_fmt(core['ceiling'], 3)}; with the bare protocol server: "
            f"{_fmt(realistic.get('ceiling_engine_core_with_bare_server'), 3)}"
        )
    return lines


def chart(result: dict[str, Any], path: Path) -> None:
    """Four panels: throughput, CPU per token, latency, and the ratios against targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    table = result["engine"]["table"]
    server = {k: v for k, v in result["server"].items() if k.startswith("ws-")}
    streams = [int(k.split("-")[1]) for k in server]

    ax = axes[0][0]
    for threads in sorted({row["threads"] for row in table}):
        rows = [row for row in table if row["threads"] == threads]
        ax.plot(
            [r["batch"] for r in rows],
            [r["tokens_per_s"] for r in rows],
            "o-",
            label=f"raw engine, {threads} thread(s)",
        )
    ax.plot(streams, [v["tokens_per_s"] for v in server.values()], "s-", label="server (WebSocket)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size / concurrent streams")
    ax.set_ylabel("tokens/s")
    ax.set_title("Throughput")
    ax.legend()

    ax = axes[0][1]
    for threads in sorted({row["threads"] for row in table}):
        rows = [row for row in table if row["threads"] == threads]
        ax.plot(
            [r["batch"] for r in rows],
            [r["cpu_per_token_us"] for r in rows],
            "o-",
            label=f"raw engine, {threads} thread(s)",
        )
    ax.plot(
        streams,
        [v["server_cpu_per_token_us"] for v in server.values()],
        "s-",
        label="server process",
    )
    realistic = result.get("realistic", {})
    measured = [r for r in realistic.get("rounds", []) if r["server_cpu_per_token_us"]]
    if measured:
        ax.plot(
            [realistic["streams"]] * len(measured),
            [r["server_cpu_per_token_us"] for r in measured],
            "x",
            color="black",
            label="server, realistic load (one point a round)",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size / concurrent streams")
    ax.set_ylabel("CPU us per token")
    ax.set_title("CPU time per generated token")
    ax.legend()

    ax = axes[1][0]
    for key, style in (("ttft_ms", "o-"), ("itl_ms", "s-")):
        for pct in ("p50", "p99"):
            ax.plot(
                streams,
                [v[key][pct] for v in server.values()],
                style,
                label=f"{key.split('_')[0].upper()} {pct}",
                alpha=1.0 if pct == "p50" else 0.5,
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("ms")
    ax.set_title("Latency (WebSocket)")
    ax.legend()

    ax = axes[1][1]
    items = [r for r in result["ratios"] if r["target"] is not None and r["value"] is not None]
    names = [textwrap.fill(r["name"], 40) for r in items]  # a long name would squeeze the plots
    # each bar is value / target, flipped for "<=" targets, so 1.0 is the line to clear
    scores = [
        (r["value"] / r["target"])
        if r["better"] == ">="
        else (r["target"] / max(r["value"], 1e-12))
        for r in items
    ]
    colors = ["tab:green" if r["met"] else "tab:red" for r in items]
    ax.barh(names, scores, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("margin over target (>1 is met)")
    ax.set_title("Targets")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
