"""Sampling parameters and the random numbers behind them.

Temperature follows the book: p^(1/T) renormalised, which is softmax(logits / T).
`top_k` keeps the k most likely words, then `top_p` keeps the smallest set of those
whose probability reaches p. Temperature below `MIN_TEMPERATURE` or top_k 1 is greedy.

`logit_bias` adds a value to chosen words' logits before all of that, and a value of
`BAN` (-100) removes the word outright; the presence and frequency penalties subtract
from the logits of the words the request has generated so far (`service.engine.adjust`).

A request with a seed draws its uniform numbers from a generator of its own, so it
gets the same tokens whatever else shares its batch; `seeded_for` mixes that seed with
how far the session has come, so continuing does not replay the previous call's draws.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

# Below this temperature sampling is greedy. 1/T then stays under 1e4, so logits * (1/T)
# is far from float32's overflow for any logit a model gives, while at T = 1e-4 a word
# only 0.01 logits behind the best is already e^-100 times less likely: greedy in effect.
MIN_TEMPERATURE = 1e-4
# A logit_bias of exactly this bans the word: it is never drawn, not even greedily.
BAN = -100.0


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # below MIN_TEMPERATURE: greedy
    top_k: int = 0  # 0: no limit; at or above the vocabulary size: no limit either
    top_p: float = 1.0  # 1.0: no limit
    seed: int | None = None
    logprobs: int = 0  # how many top candidates to report per step
    ignore_eos: bool = False  # never draw the stop token (fixed-length runs, benchmarks)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit); BAN bans
    presence_penalty: float = 0.0  # subtracted once from each generated word's logit
    frequency_penalty: float = 0.0  # subtracted per time the word was generated

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def bans(self) -> tuple[int, ...]:
        """Token ids this request may never draw."""
        return tuple(token for token, value in self.logit_bias if value <= BAN)

    @property
    def changes_logits(self) -> bool:
        """Whether its logits change beyond bans (a bias or a penalty): then its whole
        distribution is computed from the changed logits, never by the fused softmax."""
        biased = any(value > BAN for _, value in self.logit_bias)
        return biased or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def inv_temperature(self) -> float:
        """1/T, or 1 for greedy requests (which never sample)."""
        return 1.0 if self.greedy else 1.0 / self.temperature


def seeded_for(params: SamplingParams, context_tokens: int) -> SamplingParams:
    """The seed a call really uses: the request's seed, mixed with how far the session has
    come. A seeded call is reproducible from the same session state, and continuing with
    the same seed does not replay the draws of the call before it."""
    if params.seed is None or context_tokens == 0:
        return params
    mixed = np.random.SeedSequence([params.seed, context_tokens]).generate_state(2, np.uint64)
    return replace(params, seed=int(mixed[0]) >> 1)


def make_rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)


class UniformSource(Protocol):
    def random(self) -> float: ...


class Uniforms:
    """A generator's uniform numbers, drawn `chunk` at a time: the same numbers, in the
    same order, as calling `rng.random()` for each, for a fraction of the cost."""

    __slots__ = ("_buffer", "_chunk", "_next", "rng")

    def __init__(self, rng: np.random.Generator, chunk: int = 64) -> None:
        self.rng = rng
        self._chunk = chunk
        self._buffer: list[float] = []
        self._next = 0

    def random(self) -> float:
        if self._next >= len(self._buffer):
            self._buffer = self.rng.random(self._chunk).tolist()
            self._next = 0
        value = self._buffer[self._next]
        self._next += 1
        return value
