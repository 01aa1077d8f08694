"""Vectorised next-token sampling for a whole engine batch.

Temperature follows the book: p^(1/T) renormalised, which is softmax(logits / T).
`top_k` keeps the k most likely words, then `top_p` keeps the smallest set of those
whose probability reaches p. Temperature 0 or top_k 1 is greedy.

Every row draws one uniform number from its own generator, so a request with a seed
gets the same tokens whatever else shares its batch.

Rows that sample from the whole distribution (no top_k, no top_p) are the common case
and the expensive one: a softmax over the full vocabulary per row. It is done in
float32 with no per-row Python, touching each logit a few times: scale by 1/T,
softmax, block sums; then an inverse-CDF lookup, first over the block sums and then
inside one block per row (float64 running sums over small arrays). `Sampler` runs the
scale, softmax and block sums as one onnxruntime call (the "sampling head", a graph
built in memory), which is about twice as fast as numpy on the same array and
releases the GIL while it runs; `sample_batch` is the same method in numpy alone.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

import numpy as np

from service import onnx_writer as ox

CANDIDATES = 256  # top_p alone first looks for its nucleus among this many words


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1.0: no limit
    seed: int | None = None
    logprobs: int = 0  # how many top candidates to report per step

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def make_rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)


def block_width(vocab: int) -> int:
    """Inverse-CDF block width: the divisor of the vocabulary size nearest its square
    root, so no padding is needed; failing one within a factor 1.5, the square root
    rounded up (the last block is then padded)."""
    root = max(1, math.isqrt(vocab))
    for delta in range(root // 2 + 1):
        for width in (root + delta, root - delta):
            if width > 0 and vocab % width == 0:
                return width
    return root if root * root == vocab else root + 1


# --- the inverse CDF ---------------------------------------------------------------------


def _pick_in_blocks(
    weights: np.ndarray, block_sums: np.ndarray, width: int, vocab: int, u: np.ndarray
) -> np.ndarray:
    """Index per row where the running sum of `weights` passes u * total.

    `weights` (R, >= vocab) are non-negative; `block_sums` (R, nb) are the sums of
    consecutive blocks of `width` of them. Only one block per row is read again.
    """
    rows, blocks = block_sums.shape
    if rows <= SMALL_BATCH:
        return np.array(
            [_pick_in_row(weights[i], block_sums[i], width, vocab, float(u[i])) for i in range(rows)],
            dtype=np.int64,
        )
    r = np.arange(rows)
    cdf = np.cumsum(block_sums, axis=1, dtype=np.float64)  # (R, nb)
    target = u * cdf[:, -1]
    block = np.minimum((cdf <= target[:, None]).sum(axis=1), blocks - 1)
    mass = block_sums[r, block].astype(np.float64)
    before = cdf[r, block] - mass
    # where inside the block the target falls, as a fraction of the block's own mass
    frac = np.clip((target - before) / np.where(mass > 0, mass, 1.0), 0.0, 1.0)
    cols = block[:, None] * width + np.arange(width)  # (R, width)
    inside = cols < vocab
    inner = weights[r[:, None], np.minimum(cols, vocab - 1)]
    inner = np.where(inside, inner, 0.0)
    running = np.cumsum(inner, axis=1, dtype=np.float64)  # (R, width)
    offset = np.minimum((running <= (frac * running[:, -1])[:, None]).sum(axis=1), width - 1)
    index = block * width + offset
    # rounding at the very end of a row or a block must not land on a zero weight
    index = np.minimum(index, vocab - 1)
    bad = weights[r, index] <= 0
    if bad.any():
        index[bad] = np.argmax(weights[bad, :vocab], axis=1)
    return index


SMALL_BATCH = 4  # up to this many rows, plain Python lookups beat vectorised numpy


def _pick_in_row(
    weights: np.ndarray, block_sums: np.ndarray, width: int, vocab: int, u: float
) -> int:
    """`_pick_in_blocks` for one row: running sums and bisection in plain Python, which
    for one row is several times faster than numpy's per-call overhead."""
    cdf = list(itertools.accumulate(block_sums.tolist()))
    target = u * cdf[-1]
    block = min(bisect.bisect_right(cdf, target), len(cdf) - 1)
    before = cdf[block - 1] if block else 0.0
    start = block * width
    inner = list(itertools.accumulate(weights[start : min(start + width, vocab)].tolist()))
    # the target's place inside the block, scaled to the block's own running sum
    mass = cdf[block] - before
    goal = (target - before) / mass * inner[-1] if mass > 0 else 0.0
    index = start + min(bisect.bisect_right(inner, goal), len(inner) - 1)
    if weights[index] <= 0:  # rounding at the very end of a row or a block
        index = int(np.argmax(weights[:vocab]))
    return index


def _inverse_cdf(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index per row where the running sum of non-negative `weights` (R, V) passes u * total."""
    vocab = weights.shape[1]
    width = block_width(vocab)
    sums = np.add.reduceat(weights, np.arange(0, vocab, width), axis=1)
    return _pick_in_blocks(weights, sums, width, vocab, u)


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
    rows, vocab = logits.shape
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
    return _pick(cand, probs / norm[:, None], top_p, u)


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
    return cand[np.arange(len(cand)), choice]


# --- whole batches -------------------------------------------------------------------------


@dataclass
class RowParams:
    """Per-row sampling parameters of a batch, as arrays, and which rows take which path."""

    inv_t: np.ndarray  # (R,) float32, 1/T (1 for greedy rows)
    top_k: np.ndarray  # (R,) int64
    top_p: np.ndarray  # (R,) float64
    greedy: np.ndarray  # (R,) bool

    def __post_init__(self) -> None:
        truncated = ~self.greedy & ((self.top_k > 0) | (self.top_p < 1.0))
        full = ~self.greedy & ~truncated
        self.greedy_rows = np.flatnonzero(self.greedy)
        self.truncated_rows = np.flatnonzero(truncated)
        self.full_rows = np.flatnonzero(full)
        self.all_full = bool(full.all())
        self.all_greedy = bool(self.greedy.all())

    @classmethod
    def of(cls, params: list[SamplingParams]) -> RowParams:
        temperature = np.array([p.temperature for p in params], dtype=np.float32)
        top_k = np.array([p.top_k for p in params], dtype=np.int64)
        greedy = (temperature == 0.0) | (top_k == 1)
        inv_t = np.where(greedy, 1.0, 1.0 / np.where(greedy, 1.0, temperature)).astype(np.float32)
        top_p = np.array([p.top_p for p in params], dtype=np.float64)
        return cls(inv_t, top_k, top_p, greedy)

    @classmethod
    def concat(cls, parts: list[RowParams]) -> RowParams:
        return cls(
            inv_t=np.concatenate([p.inv_t for p in parts]),
            top_k=np.concatenate([p.top_k for p in parts]),
            top_p=np.concatenate([p.top_p for p in parts]),
            greedy=np.concatenate([p.greedy for p in parts]),
        )


def _sample_full(
    logits: np.ndarray, inv_t: np.ndarray, u: np.ndarray, head: SamplingHead | None
) -> np.ndarray:
    """Rows that sample from the whole distribution. Without a head, modifies `logits`."""
    if head is not None:
        return head.sample(logits, inv_t, u)
    logits *= inv_t[:, None]
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    return _inverse_cdf(logits, u)


def sample_rows(
    logits: np.ndarray, rows: RowParams, u: np.ndarray, head: SamplingHead | None = None
) -> np.ndarray:
    """One token id per row of `logits` (B, V), given per-row parameters and uniforms.

    Full-distribution rows go through `head` when given, else through numpy (which
    may modify `logits` in place).
    """
    if rows.all_full:
        return _sample_full(logits, rows.inv_t, u, head)
    if rows.all_greedy:
        return np.argmax(logits, axis=1)
    tokens = np.empty(logits.shape[0], dtype=np.int64)
    idx = rows.greedy_rows
    if len(idx):
        tokens[idx] = np.argmax(logits[idx], axis=1)
    idx = rows.truncated_rows
    if len(idx):
        tokens[idx] = _sample_truncated(
            logits[idx], rows.inv_t[idx].astype(np.float64), rows.top_k[idx], rows.top_p[idx], u[idx]
        )
    idx = rows.full_rows
    if len(idx):
        tokens[idx] = _sample_full(logits[idx], rows.inv_t[idx], u[idx], head)
    return tokens


def sample_batch(
    logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator]
) -> np.ndarray:
    """One token id per row of `logits` (B, V). `logits` may be modified in place."""
    u = np.array([rng.random() for rng in rngs], dtype=np.float64)
    return sample_rows(logits, RowParams.of(params), u)


# --- the onnxruntime sampling head ---------------------------------------------------------


def head_graph(vocab: int, width: int) -> bytes:
    """logits (B, V), inv_t (B, 1) -> probs (B, nb * width), block_sums (B, nb).

    probs = softmax(logits * inv_t) per row, padded with zeros to whole blocks.
    """
    blocks = -(-vocab // width)
    pad = blocks * width - vocab
    nodes = [ox.Node("Mul", ["logits", "inv_t"], ["scaled"])]
    initializers = [ox.tensor("block_shape", np.array([0, blocks, width], np.int64))]
    initializers.append(ox.tensor("block_axis", np.array([2], np.int64)))
    softmax_in = "scaled"
    if pad:
        nodes.append(ox.Node("Pad", ["scaled", "pads", "neg_inf"], ["padded"]))
        initializers.append(ox.tensor("pads", np.array([0, 0, 0, pad], np.int64)))
        initializers.append(ox.tensor("neg_inf", np.array(-np.inf, np.float32)))
        softmax_in = "padded"
    nodes += [
        ox.Node("Softmax", [softmax_in], ["probs"], {"axis": 1}),
        ox.Node("Reshape", ["probs", "block_shape"], ["blocked"]),
        ox.Node("ReduceSum", ["blocked", "block_axis"], ["block_sums"], {"keepdims": 0}),
    ]
    return ox.model(
        nodes,
        inputs=[
            ox.value_info("logits", ox.FLOAT, ["batch", vocab]),
            ox.value_info("inv_t", ox.FLOAT, ["batch", 1]),
        ],
        outputs=[
            ox.value_info("probs", ox.FLOAT, ["batch", blocks * width]),
            ox.value_info("block_sums", ox.FLOAT, ["batch", blocks]),
        ],
        initializers=initializers,
        name="simmer_sampling_head",
    )


class SamplingHead:
    """Full-distribution sampling with the softmax and block sums in onnxruntime."""

    def __init__(self, vocab: int, intra_op_threads: int = 1) -> None:
        import onnxruntime as ort

        from service.engine import session_options

        self.vocab = vocab
        self.width = block_width(vocab)
        self.session = ort.InferenceSession(
            head_graph(vocab, self.width),
            session_options(intra_op_threads),
            providers=["CPUExecutionProvider"],
        )

    def distribution(self, logits: np.ndarray, inv_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """softmax(logits * inv_t) padded to whole blocks (R, nb * width), and block sums."""
        feeds = {"logits": logits, "inv_t": inv_t.reshape(-1, 1)}
        probs, sums = self.session.run(None, feeds)
        return probs, sums

    def sample(self, logits: np.ndarray, inv_t: np.ndarray, u: np.ndarray) -> np.ndarray:
        probs, sums = self.distribution(logits, inv_t)
        return _pick_in_blocks(probs, sums, self.width, self.vocab, u)


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
