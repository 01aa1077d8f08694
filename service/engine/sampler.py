"""Next-token sampling for a whole engine batch, in numpy alone.

`sample_rows` takes a batch's logits (B, V) and per-row parameters (`RowParams`) and
returns one token id per row. Greedy rows take the argmax; rows with top_k and/or top_p
sample inside a sorted candidate set; rows that sample the whole distribution go to a
`FullSampler` when one is given (`service.engine.head.SamplingHead`, which does most of
the work in onnxruntime) and are sampled directly here otherwise.

Direct sampling computes a weight for every word, then looks the target up first over
the sums of blocks of about sqrt(V) consecutive words and then inside one block. Each
row draws its uniform number from its own generator, and how many it draws depends only
on its own logits, so a seeded row gets the same token whatever shares its batch.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.engine.params import MIN_TEMPERATURE, SamplingParams, UniformSource
from simmer.bundle import block_width

CANDIDATES = 256  # top_p alone first looks for its nucleus among this many words
PLAIN_ROWS = 4  # up to this many rows, inverse-CDF lookups run in plain Python


class FullSampler(Protocol):
    """Samples rows from their whole distribution softmax(logits * inv_t)."""

    def sample(
        self,
        logits: np.ndarray,
        inv_t: np.ndarray,
        rngs: Sequence[UniformSource],
        direct: bool = False,
    ) -> np.ndarray: ...


def draw(rngs: Sequence[UniformSource], rows: np.ndarray | None = None) -> np.ndarray:
    """One uniform number in [0, 1) from each row's own generator."""
    if rows is None:
        return np.array([rng.random() for rng in rngs], dtype=np.float64)
    return np.array([rngs[i].random() for i in rows.tolist()], dtype=np.float64)


# --- direct sampling: a weight for every word ------------------------------------------


def _pick(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index per row where the running sum of non-negative `weights` (R, V) passes u * total."""
    width = block_width(weights.shape[1])
    sums = np.add.reduceat(weights, np.arange(0, weights.shape[1], width), axis=1, dtype=np.float64)
    return pick_in_blocks(weights, sums, width, u)


def pick_in_blocks(weights: np.ndarray, sums: np.ndarray, width: int, u: np.ndarray) -> np.ndarray:
    """`_pick` given the sums of consecutive blocks of `width` weights (R, nb): the
    target is found among the block sums, then by a running sum inside one block."""
    rows, vocab = weights.shape
    if rows <= PLAIN_ROWS:
        return np.array(
            [_pick_row(weights[i], sums[i], width, float(u[i])) for i in range(rows)], np.int64
        )
    cdf = np.cumsum(sums, axis=1, dtype=np.float64)
    target = u * cdf[:, -1]
    block = np.minimum((cdf <= target[:, None]).sum(axis=1), cdf.shape[1] - 1)
    r = np.arange(rows)
    before = cdf[r, block] - sums[r, block]
    cols = block[:, None] * width + np.arange(width)  # (R, width)
    inner = np.where(cols < vocab, weights[r[:, None], np.minimum(cols, vocab - 1)], 0.0)
    # running sums from `before`, added in the same order as `_pick_row` adds them
    running = np.cumsum(np.concatenate([before[:, None], inner], axis=1), axis=1)[:, 1:]
    offset = np.minimum((running <= target[:, None]).sum(axis=1), width - 1)
    index: np.ndarray = np.minimum(block * width + offset, vocab - 1)
    # rounding at the very end of a row or a block must not land on a zero weight
    bad = weights[r, index] <= 0
    if bad.any():
        index[bad] = np.argmax(weights[bad], axis=1)
    return index


def _pick_row(weights: np.ndarray, sums: np.ndarray, width: int, u: float) -> int:
    """`_pick` for one row, in plain Python: for one row, faster than numpy calls."""
    cdf = list(itertools.accumulate(sums.tolist()))
    target = u * cdf[-1]
    block = min(bisect.bisect_right(cdf, target), len(cdf) - 1)
    before = cdf[block - 1] if block else 0.0
    start = block * width
    running = list(itertools.accumulate(weights[start : start + width].tolist(), initial=before))
    index = start + min(bisect.bisect_right(running, target, lo=1) - 1, len(running) - 2)
    if weights[index] <= 0:  # rounding at the very end of a row or a block
        index = int(np.argmax(weights))
    return index


def sample_direct(logits: np.ndarray, inv_t: np.ndarray, u: np.ndarray) -> np.ndarray:
    """softmax(logits * inv_t) weights for every word, then `_pick`. Modifies `logits`."""
    logits -= logits.max(axis=1, keepdims=True)
    logits *= inv_t[:, None]
    np.exp(logits, out=logits)
    return _pick(logits, u)


def pick_weighted(
    weights: np.ndarray, sums: np.ndarray, rngs: Sequence[UniformSource]
) -> np.ndarray:
    """One token per row from `direct_extension`'s weights and block sums."""
    width = weights.shape[1] // sums.shape[1]
    return pick_in_blocks(weights, sums, width, draw(rngs))


# --- top-k and top-p -----------------------------------------------------------------------


def _sorted_candidates(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits per row, largest first: (R, k)."""
    vocab = logits.shape[1]
    if k >= vocab:
        return np.argsort(-logits, axis=1, kind="stable")
    cand = np.argpartition(logits, vocab - k, axis=1)[:, vocab - k :]
    order = np.argsort(-np.take_along_axis(logits, cand, axis=1), axis=1, kind="stable")
    return np.take_along_axis(cand, order, axis=1)


def _sample_truncated(
    logits: np.ndarray, inv_t: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, u: np.ndarray
) -> np.ndarray:
    """Rows with top_k and/or top_p: cut a sorted candidate set, sample inside it."""
    vocab = logits.shape[1]
    limit = np.where(top_k > 0, np.minimum(top_k, vocab), vocab)
    if (top_k > 0).all():
        k_cand = int(limit.max())
    else:
        k_cand = max(int(limit[top_k > 0].max(initial=0)), CANDIDATES)
    k_cand = min(k_cand, vocab)
    cand = _sorted_candidates(logits, k_cand)
    scaled = np.take_along_axis(logits, cand, axis=1).astype(np.float64) * inv_t[:, None]
    top = scaled[:, :1]
    probs = np.exp(scaled - top)
    probs[np.arange(k_cand)[None, :] >= limit[:, None]] = 0.0
    # normaliser: the candidates when top_k cuts, else the whole row
    norm = probs.sum(axis=1)
    whole = top_k == 0
    if whole.any():
        full = (logits[whole].astype(np.float64) * inv_t[whole, None]) - top[whole]
        norm[whole] = np.exp(full).sum(axis=1)
        short = whole & (probs.sum(axis=1) < top_p * norm)
        if short.any() and k_cand < vocab:
            # the nucleus is wider than the candidate set: sort these rows in full
            return _sample_truncated_wide(logits, inv_t, top_p, u, cand, probs, norm, short)
    return _pick_nucleus(cand, probs / norm[:, None], top_p, u)


def _sample_truncated_wide(
    logits: np.ndarray,
    inv_t: np.ndarray,
    top_p: np.ndarray,
    u: np.ndarray,
    cand: np.ndarray,
    probs: np.ndarray,
    norm: np.ndarray,
    short: np.ndarray,
) -> np.ndarray:
    out = np.empty(len(logits), dtype=np.int64)
    fine = ~short
    if fine.any():
        out[fine] = _pick_nucleus(cand[fine], probs[fine] / norm[fine, None], top_p[fine], u[fine])
    idx = np.flatnonzero(short)
    wide = _sorted_candidates(logits[idx], logits.shape[1])
    scaled = np.take_along_axis(logits[idx], wide, axis=1).astype(np.float64) * inv_t[idx, None]
    wide_probs = np.exp(scaled - scaled[:, :1])
    wide_probs /= wide_probs.sum(axis=1, keepdims=True)
    out[idx] = _pick_nucleus(wide, wide_probs, top_p[idx], u[idx])
    return out


def _pick_nucleus(
    cand: np.ndarray, probs: np.ndarray, top_p: np.ndarray, u: np.ndarray
) -> np.ndarray:
    """Keep each sorted candidate while the mass before it is short of top_p; sample."""
    cumulative = np.cumsum(probs, axis=1)
    keep = (cumulative - probs) < top_p[:, None]
    keep[:, 0] = True
    choice = _pick(np.where(keep, probs, 0.0), u)
    chosen: np.ndarray = cand[np.arange(len(cand)), choice]
    return chosen


# --- whole batches -------------------------------------------------------------------------


@dataclass
class RowParams:
    """Per-row sampling parameters of a batch, as arrays, and which rows take which path."""

    inv_t: np.ndarray  # (R,) float32, 1/T (1 for greedy rows)
    top_k: np.ndarray  # (R,) int64
    top_p: np.ndarray  # (R,) float64
    greedy: np.ndarray  # (R,) bool
    seeded: np.ndarray  # (R,) bool: the request gave a seed

    def __post_init__(self) -> None:
        truncated = ~self.greedy & ((self.top_k > 0) | (self.top_p < 1.0))
        full = ~self.greedy & ~truncated
        self.greedy_rows = np.flatnonzero(self.greedy)
        self.truncated_rows = np.flatnonzero(truncated)
        # seeded rows always sample directly, so their tokens never depend on how
        # many rows share their batch (which decides between direct and envelope)
        self.full_rows = np.flatnonzero(full & ~self.seeded)
        self.seeded_full_rows = np.flatnonzero(full & self.seeded)
        self.all_full = bool((full & ~self.seeded).all())
        self.all_whole = bool(full.all())  # every row samples the whole distribution
        self.all_greedy = bool(self.greedy.all())

    def take(self, rows: np.ndarray) -> RowParams:
        """The parameters of these rows only, as a batch of their own."""
        return RowParams(
            self.inv_t[rows],
            self.top_k[rows],
            self.top_p[rows],
            self.greedy[rows],
            self.seeded[rows],
        )

    @classmethod
    def of(cls, params: list[SamplingParams]) -> RowParams:
        top_k = np.array([p.top_k for p in params], dtype=np.int64)
        greedy = np.array([p.greedy for p in params], dtype=bool)
        inv_t = np.array([p.inv_temperature for p in params], np.float32)
        top_p = np.array([p.top_p for p in params], dtype=np.float64)
        seeded = np.array([p.seed is not None for p in params], dtype=bool)
        return cls(inv_t, top_k, top_p, greedy, seeded)


def _sample_full(
    logits: np.ndarray,
    inv_t: np.ndarray,
    rngs: Sequence[UniformSource],
    head: FullSampler | None,
    direct: bool = False,
) -> np.ndarray:
    """Rows that sample from the whole distribution. Without a head, modifies `logits`."""
    if head is not None:
        return head.sample(logits, inv_t, rngs, direct)
    return sample_direct(logits, inv_t, draw(rngs))


def sample_rows(
    logits: np.ndarray,
    rows: RowParams,
    rngs: Sequence[UniformSource],
    head: FullSampler | None = None,
) -> np.ndarray:
    """One token id per row of `logits` (B, V), given per-row parameters and generators.

    Full-distribution rows go through `head` when given, else directly in numpy (which
    may modify `logits` in place).
    """
    if rows.all_full:
        return _sample_full(logits, rows.inv_t, rngs, head)
    if rows.all_greedy:
        greedy: np.ndarray = np.argmax(logits, axis=1)
        return greedy
    tokens = np.empty(logits.shape[0], dtype=np.int64)
    idx = rows.greedy_rows
    if len(idx):
        tokens[idx] = np.argmax(logits[idx], axis=1)
    idx = rows.truncated_rows
    if len(idx):
        tokens[idx] = _sample_truncated(
            logits[idx],
            rows.inv_t[idx].astype(np.float64),
            rows.top_k[idx],
            rows.top_p[idx],
            draw(rngs, idx),
        )
    for idx, direct in ((rows.full_rows, False), (rows.seeded_full_rows, True)):
        if len(idx):
            tokens[idx] = _sample_full(
                logits[idx], rows.inv_t[idx], [rngs[i] for i in idx.tolist()], head, direct
            )
    return tokens


def sample_batch(
    logits: np.ndarray, params: list[SamplingParams], rngs: Sequence[UniformSource]
) -> np.ndarray:
    """One token id per row of `logits` (B, V). `logits` may be modified in place."""
    return sample_rows(logits, RowParams.of(params), rngs)


def log_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """log softmax(logits / T) in float64: the distribution a token is drawn from (at
    T = 1 for a temperature below MIN_TEMPERATURE, which samples greedily)."""
    scaled = logits.astype(np.float64) / (temperature if temperature >= MIN_TEMPERATURE else 1.0)
    scaled -= scaled.max()
    return scaled - np.log(np.exp(scaled).sum())  # type: ignore[no-any-return]


def top_ids(logp: np.ndarray, n: int) -> np.ndarray:
    """The n largest entries' ids, largest first."""
    n = min(n, logp.shape[0])
    ids = np.argpartition(logp, logp.shape[0] - n)[-n:]
    return ids[np.argsort(-logp[ids], kind="stable")]
