"""Soak: many concurrent WebSocket streams against a real server, for a while.

    python -m bench.soak --bundle models/default --streams 256 --seconds 60 --out soak.json

Starts `python -m service` on a free port, runs `--streams` clients
that each generate fixed-length completions back to back (continuing their session,
then starting a fresh one every few turns), and samples the server's resident memory
every second. It reports the errors (any error event, refused or broken connection),
the tokens streamed, and the memory growth after the warm-up. Exits 1 when there was
any error or memory grew by more than --max-rss-growth.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import websockets

from bench.procstat import rss_bytes
from harness.server import ServiceProcess


@dataclass
class SoakResult:
    streams: int
    seconds: float
    warmup_s: float
    generations: int = 0
    tokens: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    rss_samples_mb: list[float] = field(default_factory=list)
    rss_after_warmup_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_growth: float = 0.0
    tokens_per_s: float = 0.0


async def _client(url: str, tokens: int, deadline: float, result: SoakResult) -> None:
    while time.monotonic() < deadline:
        try:
            async with websockets.connect(url, max_size=None, compression=None) as ws:
                for turn in range(4):  # four turns on one session, then a new one
                    if time.monotonic() >= deadline:
                        return
                    prompt = "recipe for soup |" if turn == 0 else ""
                    await ws.send(
                        json.dumps(
                            {
                                "type": "generate",
                                "prompt": prompt,
                                "max_tokens": tokens,
                                "ignore_eos": True,
                            }
                        )
                    )
                    while True:
                        event = json.loads(await ws.recv())
                        if event["type"] == "token":
                            result.tokens += event.get("count", 1)
                        elif event["type"] == "done":
                            result.generations += 1
                            break
                        elif event["type"] == "error":
                            raise RuntimeError(f"{event['code']}: {event['message']}")
        except (OSError, RuntimeError, websockets.WebSocketException) as exc:
            result.errors += 1
            if len(result.error_samples) < 5:
                result.error_samples.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.1)


async def _sample_rss(server: ServiceProcess, deadline: float, result: SoakResult) -> None:
    while time.monotonic() < deadline:
        result.rss_samples_mb.append(round(rss_bytes(server.proc.pid) / 2**20, 2))
        await asyncio.sleep(1.0)


async def soak(
    server: ServiceProcess, streams: int, seconds: float, tokens: int, warmup_s: float
) -> SoakResult:
    result = SoakResult(streams=streams, seconds=seconds, warmup_s=warmup_s)
    started = time.monotonic()
    deadline = started + seconds
    sampler = asyncio.create_task(_sample_rss(server, deadline, result))
    await asyncio.gather(
        *[_client(server.ws_url, tokens, deadline, result) for _ in range(streams)]
    )
    await sampler
    elapsed = time.monotonic() - started
    result.tokens_per_s = result.tokens / elapsed
    samples = result.rss_samples_mb
    after = samples[min(len(samples) - 1, int(warmup_s))] if samples else 0.0
    result.rss_after_warmup_mb = after
    result.rss_end_mb = samples[-1] if samples else 0.0
    result.rss_growth = (result.rss_end_mb - after) / after if after else 0.0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--bundle", type=Path, default=Path("models/default"))
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per generation")
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds (default: 20%% of the run)"
    )
    parser.add_argument("--max-rss-growth", type=float, default=0.10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else args.seconds * 0.2
    with tempfile.TemporaryDirectory() as tmp:
        server = ServiceProcess(
            args.bundle,
            Path(tmp) / "server.log",
            max_batch=str(max(args.streams, 1)),
            log_level="warning",
        )
        try:
            server.wait_ready()
            result = asyncio.run(soak(server, args.streams, args.seconds, args.tokens, warmup))
            load = httpx.get(f"{server.base_url}/readyz", timeout=10).json().get("load")
        except RuntimeError as exc:
            print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 2
        finally:
            server.stop()
    report = {**asdict(result), "load_after": load}
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(
        f"soak: {result.streams} streams x {result.seconds:.0f} s: "
        f"{result.generations} generations, "
        f"{result.tokens} tokens ({result.tokens_per_s:,.0f} tok/s), {result.errors} errors, "
        f"RSS {result.rss_after_warmup_mb:.1f} -> {result.rss_end_mb:.1f} MB "
        f"({result.rss_growth:+.1%} after {warmup:.0f} s warm-up)"
    )
    ok = result.errors == 0 and result.rss_growth <= args.max_rss_growth
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
