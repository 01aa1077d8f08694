"""What the [UNK] ban and the repetition penalties do to samples, on a real server.

    python -m bench.sampling --bundle models/default [--samples 50] [--json OUT]

Starts `python -m service` on the bundle (SIMMER_BAN_UNK at its default: on) and asks
/v1/completions for samples from `recipe for <dish> |` prompts. Sample i of every
variant has the same dish and seed, so each pair differs only in what is measured:

- [UNK]: T = 1.0, up to 150 tokens (a sample may end at the stop token), with the
  server's ban and with it lifted by the request (`logit_bias: {"1": 0}`): the share of
  generated tokens that are [UNK], and the share of samples with at least one.
- repetition: T = 0.3, exactly 150 tokens (`ignore_eos`), presence and frequency
  penalties both 0, 0.5 and 2.0: the word repeat rate (the share of generated tokens
  that repeat a word generated earlier in the same sample) and the window repeat rate
  (the share of 8-word windows seen earlier in the same sample, as training.evaluate
  counts it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from harness.server import ServiceProcess

DISHES = (
    "apple pie",
    "chicken soup",
    "beef stew",
    "chocolate cake",
    "green salad",
    "tomato sauce",
    "roast lamb",
    "lemon tart",
    "fried rice",
    "pumpkin bread",
)
WINDOW = 8
CONCURRENCY = 16  # requests in flight, so the engine batches them


def word_repeat_rate(words: Sequence[str]) -> float:
    """The share of tokens that repeat a word seen earlier in the same sample."""
    return 1.0 - len(set(words)) / len(words) if words else 0.0


def window_repeat_rate(words: Sequence[str], window: int = WINDOW) -> float | None:
    """The share of `window`-word windows seen earlier in the same sample."""
    seen: set[tuple[str, ...]] = set()
    repeats = total = 0
    for start in range(len(words) - window + 1):
        key = tuple(words[start : start + window])
        repeats += key in seen
        total += 1
        seen.add(key)
    return repeats / total if total else None


async def _samples(client: httpx.AsyncClient, count: int, body: dict[str, Any]) -> list[list[str]]:
    """`count` samples' tokens; sample i from DISHES[i % 10] with seed i."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> list[str]:
        request = {
            **body,
            "prompt": f"recipe for {DISHES[i % len(DISHES)]} |",
            "seed": i,
            "logprobs": 1,
        }
        async with gate:
            response = await client.post("/v1/completions", json=request, timeout=600)
        response.raise_for_status()
        tokens: list[str] = response.json()["choices"][0]["logprobs"]["tokens"]
        return tokens

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


async def measure(base_url: str, count: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url) as client:
        unk: dict[str, Any] = {}
        for name, extra in (("banned (default)", {}), ("lifted", {"logit_bias": {"1": 0}})):
            samples = await _samples(
                client, count, {"max_tokens": 150, "temperature": 1.0, **extra}
            )
            tokens = sum(len(s) for s in samples)
            unks = sum(s.count("[UNK]") for s in samples)
            unk[name] = {
                "tokens": tokens,
                "unk_token_share": unks / tokens if tokens else 0.0,
                "samples_with_unk": sum("[UNK]" in s for s in samples) / len(samples),
            }
        repetition: dict[str, Any] = {}
        for penalty in (0.0, 0.5, 2.0):
            body = {
                "max_tokens": 150,
                "temperature": 0.3,
                "ignore_eos": True,
                "presence_penalty": penalty,
                "frequency_penalty": penalty,
            }
            samples = await _samples(client, count, body)
            repetition[f"penalties {penalty:g}"] = {
                "word_repeat_rate": _mean([word_repeat_rate(s) for s in samples]),
                "window_repeat_rate": _mean([window_repeat_rate(s) for s in samples]),
            }
    return {"samples_per_variant": count, "unk": unk, "repetition": repetition}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=50, help="samples per variant")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory() as tmp,
        ServiceProcess(args.bundle, Path(tmp) / "server.log") as server,
    ):
        results = asyncio.run(measure(server.base_url, args.samples))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
