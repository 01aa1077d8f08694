"""Vectorised next-token sampling for a whole engine batch.

Temperature follows the book: p^(1/T) renormalised, which is softmax(logits / T).
`top_k` keeps the k most likely words, then `top_p` keeps the smallest set of those
whose probability reaches p. Temperature 0 or top_k 1 is greedy.

Every row draws one uniform number from its own generator, so a request with a seed
gets the same tokens whatever else shares its batch. The full-distribution path
touches each logit a few times in float32 with no per-row Python: scale, exp, block
sums, then an inverse-CDF lookup within one block of each row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 128  # inverse-CDF block width: block sums first, then a cumsum inside one block


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1.0: no limit
    seed: int | None = None
    logprobs: int = 0  # how many top candidates to report per step
    ignore_eos: bool = False  # never draw the stop token (fixed-length runs, benchmarks)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def make_rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)


def _inverse_cdf(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index per row where the running sum of non-negative `weights` passes u * total."""
    width = weights.shape[1]
    rows = weights.shape[0]
    pad = (-width) % BLOCK
    if pad:
        weights = np.concatenate([weights, np.zeros((rows, pad), weights.dtype)], axis=1)
    blocks = weights.reshape(rows, -1, BLOCK)
    block_sums = blocks.sum(axis=2).astype(np.float64)  # (R, nb)
    block_cdf = np.cumsum(block_sums, axis=1)
    target = u * block_cdf[:, -1]
    block = np.minimum((block_cdf <= target[:, None]).sum(axis=1), block_cdf.shape[1] - 1)
    before = np.where(block > 0, block_cdf[np.arange(rows), block - 1], 0.0)
    inner = np.cumsum(blocks[np.arange(rows), block].astype(np.float64), axis=1)  # (R, BLOCK)
    offset = np.minimum((inner <= (target - before)[:, None]).sum(axis=1), BLOCK - 1)
    index = block * BLOCK + offset
    # never land on padding or a zero-weight slot through rounding at the very end
    last_valid = width - 1
    index = np.minimum(index, last_valid)
    bad = weights[np.arange(rows), index] <= 0
    if bad.any():
        index[bad] = np.argmax(weights[bad], axis=1)
    return np.asarray(index, dtype=np.int64)


CANDIDATES = 256  # top_p alone first looks for its nucleus among this many words


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
    k_cand = (
        int(limit.max())
        if (top_k > 0).all()
        else max(int(limit[top_k > 0].max(initial=0)), CANDIDATES)
    )
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
            return _sample_truncated_wide(logits, inv_t, top_k, top_p, u, cand, probs, norm, short)
    return _pick(cand, probs / norm[:, None], top_p, u)


def _sample_truncated_wide(
    logits: np.ndarray,
    inv_t: np.ndarray,
    top_k: np.ndarray,
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
        out[fine] = _pick(cand[fine], probs[fine] / norm[fine, None], top_p[fine], u[fine])
    idx = np.flatnonzero(short)
    wide = _sorted_candidates(logits[idx], logits.shape[1])
    scaled = np.take_along_axis(logits[idx], wide, axis=1).astype(np.float64) * inv_t[idx, None]
    wide_probs = np.exp(scaled - scaled[:, :1])
    wide_probs /= wide_probs.sum(axis=1, keepdims=True)
    out[idx] = _pick(wide, wide_probs, top_p[idx], u[idx])
    return out


def _pick(cand: np.ndarray, probs: np.ndarray, top_p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Keep each sorted candidate while the mass before it is short of top_p; sample."""
    cumulative = np.cumsum(probs, axis=1)
    keep = (cumulative - probs) < top_p[:, None]
    keep[:, 0] = True
    choice = _inverse_cdf(np.where(keep, probs, 0.0), u)
    return np.asarray(cand[np.arange(len(cand)), choice], dtype=np.int64)


def sample_batch(
    logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator]
) -> np.ndarray:
    """One token id per row of `logits` (B, V). `logits` may be modified in place."""
    rows = logits.shape[0]
    tokens = np.empty(rows, dtype=np.int64)
    temperature = np.array([p.temperature for p in params], dtype=np.float32)
    top_k = np.array([p.top_k for p in params], dtype=np.int64)
    top_p = np.array([p.top_p for p in params], dtype=np.float64)
    greedy = (temperature == 0.0) | (top_k == 1)
    u = np.array([rng.random() for rng in rngs], dtype=np.float64)

    if greedy.all():
        return np.asarray(np.argmax(logits, axis=1), dtype=np.int64)
    if greedy.any():
        tokens[greedy] = np.argmax(logits[greedy], axis=1)
    truncated = ~greedy & ((top_k > 0) | (top_p < 1.0))
    if truncated.any():
        idx = np.flatnonzero(truncated)
        tokens[idx] = _sample_truncated(
            logits[idx], 1.0 / temperature[idx], top_k[idx], top_p[idx], u[idx]
        )
    full = ~greedy & ~truncated
    if full.any():
        idx = np.flatnonzero(full)
        sub = logits if len(idx) == rows else logits[idx]
        sub -= sub.max(axis=1, keepdims=True)
        sub *= (1.0 / temperature[idx])[:, None]
        np.exp(sub, out=sub)
        tokens[idx] = _inverse_cdf(sub, u[idx])
    return tokens


def log_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """log softmax(logits / T) in float64: the distribution a token is drawn from."""
    scaled = logits.astype(np.float64) / (temperature if temperature > 0 else 1.0)
    scaled -= scaled.max()
    return scaled - np.log(np.exp(scaled).sum())  # type: ignore[no-any-return]


def top_ids(logp: np.ndarray, n: int) -> np.ndarray:
    """The n largest entries' ids, largest first."""
    n = min(n, logp.shape[0])
    ids = np.argpartition(logp, logp.shape[0] - n)[-n:]
    return ids[np.argsort(-logp[ids], kind="stable")]
