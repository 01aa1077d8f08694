"""Vectorised next-token sampling for a whole engine batch.

Temperature follows the book: p^(1/T) renormalised, which is softmax(logits / T).
`top_k` keeps the k most likely words, then `top_p` keeps the smallest set of those
whose probability reaches p. Temperature 0 or top_k 1 is greedy.

A row sampled directly draws its uniform numbers from its own generator, and how many
it draws depends only on its own logits; rows with a seed are always sampled directly,
so a request with a seed gets the same tokens whatever else shares its batch. Rows
without one may go through the envelope, whose trials draw from one generator for the
whole batch.

Rows that sample from the whole distribution (no top_k, no top_p) are the common case
and the expensive one. Sampling them directly needs a weight exp(l / T) for every
word, and exp over (B, V) floats costs about as much as the engine step that made the
logits. So `SamplingHead` samples exactly by rejection from an envelope, computing
exps for a small part of each row:

1. the vocabulary is cut into blocks of about sqrt(V) consecutive words (the
   tokenizer orders words by frequency, so a block's words have similar weights), and
   each block's largest logit M_j is taken: one pass over the logits, no exp;
2. the `EXACT_BLOCKS` blocks with the largest M_j get exact weights exp((l - max) / T);
   every other block gets the bound size_j * exp((M_j - max) / T) on its mass;
3. a trial picks a block in proportion to its exact mass or its bound. In an exact
   block the word is picked by its weight and the trial succeeds; in any other block
   a word is picked uniformly and kept with probability exp((l - M_j) / T), which is
   at most 1, else the trial fails and the row tries again.

A trial returns word w with probability exp((l_w - max) / T) / W, W the same for every
word, so the result is exactly softmax(logits / T). Steps 1 and 2 are one small
onnxruntime graph (built in memory by `envelope_graph`); the trials are numpy over
small arrays. For trained models most of the mass sits in a few blocks, and for
random ones every block is flat, so most rows succeed at the first trial; a row that
fails `MAX_TRIALS` times is sampled directly, which keeps the result exact.

Direct sampling, used for up to `SMALL_BATCH` rows (where the envelope's fixed costs
outweigh what it saves), for seeded rows, and where the head is not available: weights
for the whole row (softmax in onnxruntime, or numpy without the head), then an
inverse-CDF lookup first over block sums and then inside one block. For a small decode
batch the scheduler has the engine compute those weights in its own onnxruntime call
(`direct_extension` added to the model's graph) and only the lookup runs here.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service import onnx_writer as ox

CANDIDATES = 256  # top_p alone first looks for its nucleus among this many words
SMALL_BATCH = 32  # up to this many full-distribution rows, the head samples directly
PLAIN_ROWS = 4  # up to this many rows, inverse-CDF lookups run in plain Python
EXACT_BLOCKS = 8  # blocks per row whose words get exact weights in the envelope
MAX_TRIALS = 8  # envelope trials before a row is sampled directly


# Below this temperature sampling is greedy. 1/T then stays under 1e4, so logits * (1/T)
# is far from float32's overflow for any logit a model gives, while at T = 1e-4 a word
# only 0.01 logits behind the best is already e^-100 times less likely: greedy in effect.
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # below MIN_TEMPERATURE: greedy
    top_k: int = 0  # 0: no limit; at or above the vocabulary size: no limit either
    top_p: float = 1.0  # 1.0: no limit
    seed: int | None = None
    logprobs: int = 0  # how many top candidates to report per step
    ignore_eos: bool = False  # never draw the stop token (fixed-length runs, benchmarks)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def inv_temperature(self) -> float:
        """1/T, or 1 for greedy rows (whose distribution is reported at T = 1)."""
        return 1.0 if self.temperature < MIN_TEMPERATURE else 1.0 / self.temperature


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


def _draw(rngs: Sequence[UniformSource], rows: np.ndarray | None = None) -> np.ndarray:
    """One uniform number in [0, 1) from each row's own generator."""
    if rows is None:
        return np.array([rng.random() for rng in rngs], dtype=np.float64)
    return np.array([rngs[i].random() for i in rows.tolist()], dtype=np.float64)


def block_width(vocab: int) -> int:
    """Words per block: the square root of the vocabulary size, rounded up."""
    return max(1, math.isqrt(vocab - 1) + 1) if vocab > 1 else 1


# --- direct sampling: a weight for every word ------------------------------------------


def _pick(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index per row where the running sum of non-negative `weights` (R, V) passes u * total."""
    width = block_width(weights.shape[1])
    sums = np.add.reduceat(weights, np.arange(0, weights.shape[1], width), axis=1, dtype=np.float64)
    return _pick_in_blocks(weights, sums, width, u)


def _pick_in_blocks(weights: np.ndarray, sums: np.ndarray, width: int, u: np.ndarray) -> np.ndarray:
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


def _sample_direct(logits: np.ndarray, inv_t: np.ndarray, u: np.ndarray) -> np.ndarray:
    """softmax(logits * inv_t) weights for every word, then `_pick`. Modifies `logits`."""
    logits -= logits.max(axis=1, keepdims=True)
    logits *= inv_t[:, None]
    np.exp(logits, out=logits)
    return _pick(logits, u)


# --- sampling from the envelope ----------------------------------------------------------


def envelope_graph(vocab: int, width: int, exact_blocks: int) -> bytes:
    """The ONNX graph of steps 1 and 2 (see the module docstring).

    Inputs: logits float32 (B, V), inv_t float32 (B, 1). Outputs: block_max (B, nb),
    bound (B, nb) = exp((block_max - max) * inv_t), exact int64 (B, k) (the blocks
    with the largest maxima), weights (B, k, width) = exp((logit - max) * inv_t) of
    their words, mass (B, k) = their sums. Words past the end of the vocabulary
    (padding of the last block) have weight 0.
    """
    blocks = -(-vocab // width)
    pad = blocks * width - vocab

    def ints(name: str, values: list[int]) -> bytes:
        return ox.tensor(name, np.array(values, np.int64))

    initializers = [ints("block_shape", [0, blocks, width]), ints("axis1", [1]), ints("axis2", [2])]
    initializers.append(ints("k", [exact_blocks]))
    nodes = []
    source = "logits"
    if pad:
        nodes.append(ox.Node("Pad", ["logits", "pads", "neg_inf"], ["padded"]))
        initializers.append(ints("pads", [0, 0, 0, pad]))
        initializers.append(ox.tensor("neg_inf", np.array(-np.inf, np.float32)))
        source = "padded"
    nodes += [
        ox.Node("Reshape", [source, "block_shape"], ["blocked"]),  # (B, nb, width)
        ox.Node("ReduceMax", ["blocked", "axis2"], ["block_max"], {"keepdims": 0}),
        ox.Node("ReduceMax", ["block_max", "axis1"], ["top"], {"keepdims": 1}),  # (B, 1)
        ox.Node("Sub", ["block_max", "top"], ["block_gap"]),
        ox.Node("Mul", ["block_gap", "inv_t"], ["block_log"]),
        ox.Node("Exp", ["block_log"], ["bound"]),
        ox.Node("TopK", ["block_max", "k"], ["exact_max", "exact"], {"axis": 1}),
        ox.Node("Unsqueeze", ["exact", "axis2"], ["exact_index"]),  # (B, k, 1)
        ox.Node("GatherND", ["blocked", "exact_index"], ["exact_logits"], {"batch_dims": 1}),
        ox.Node("Unsqueeze", ["top", "axis2"], ["top3"]),
        ox.Node("Unsqueeze", ["inv_t", "axis2"], ["inv_t3"]),
        ox.Node("Sub", ["exact_logits", "top3"], ["word_gap"]),
        ox.Node("Mul", ["word_gap", "inv_t3"], ["word_log"]),
        ox.Node("Exp", ["word_log"], ["weights"]),  # (B, k, width)
        ox.Node("ReduceSum", ["weights", "axis2"], ["mass"], {"keepdims": 0}),
    ]
    return ox.model(
        nodes,
        inputs=[
            ox.value_info("logits", ox.FLOAT, ["batch", vocab]),
            ox.value_info("inv_t", ox.FLOAT, ["batch", 1]),
        ],
        outputs=[
            ox.value_info("block_max", ox.FLOAT, ["batch", blocks]),
            ox.value_info("bound", ox.FLOAT, ["batch", blocks]),
            ox.value_info("exact", ox.INT64, ["batch", exact_blocks]),
            ox.value_info("weights", ox.FLOAT, ["batch", exact_blocks, width]),
            ox.value_info("mass", ox.FLOAT, ["batch", exact_blocks]),
        ],
        initializers=initializers,
        name="simmer_sampling_envelope",
    )


def direct_extension(vocab: int, width: int, logits: str = "logits") -> ox.Graph:
    """Nodes from `logits` (B, V) and a new input inv_t (B, 1) to weights (B, nb * width)
    = softmax(logits * inv_t), zero past the vocabulary, and their block sums (B, nb):
    direct sampling's heavy part. Valid at opset 13 and later."""
    blocks = -(-vocab // width)
    pad = blocks * width - vocab
    initializers = [
        ox.tensor("sampling_block_shape", np.array([0, blocks, width], np.int64)),
        ox.tensor("sampling_axis2", np.array([2], np.int64)),
    ]
    nodes = [ox.Node("Mul", [logits, "inv_t"], ["sampling_scaled"])]
    source = "sampling_scaled"
    if pad:
        nodes.append(
            ox.Node("Pad", [source, "sampling_pads", "sampling_neg_inf"], ["sampling_padded"])
        )
        initializers.append(ox.tensor("sampling_pads", np.array([0, 0, 0, pad], np.int64)))
        initializers.append(ox.tensor("sampling_neg_inf", np.array(-np.inf, np.float32)))
        source = "sampling_padded"
    nodes += [
        ox.Node("Softmax", [source], ["weights"], {"axis": 1}),
        ox.Node("Reshape", ["weights", "sampling_block_shape"], ["sampling_blocked"]),
        ox.Node("ReduceSum", ["sampling_blocked", "sampling_axis2"], ["sums"], {"keepdims": 0}),
    ]
    return ox.Graph(
        nodes,
        inputs=[ox.value_info("inv_t", ox.FLOAT, ["batch", 1])],
        outputs=[
            ox.value_info("weights", ox.FLOAT, ["batch", blocks * width]),
            ox.value_info("sums", ox.FLOAT, ["batch", blocks]),
        ],
        initializers=initializers,
    )


def direct_graph(vocab: int, width: int) -> bytes:
    """logits (B, V), inv_t (B, 1) -> weights and block sums (see `direct_extension`)."""
    part = direct_extension(vocab, width)
    return ox.model(
        part.nodes,
        inputs=[ox.value_info("logits", ox.FLOAT, ["batch", vocab]), *part.inputs],
        outputs=part.outputs,
        initializers=part.initializers,
        name="simmer_sampling_direct",
    )


def pick_weighted(
    weights: np.ndarray, sums: np.ndarray, rngs: Sequence[UniformSource]
) -> np.ndarray:
    """One token per row from `direct_extension`'s weights and block sums."""
    width = weights.shape[1] // sums.shape[1]
    return _pick_in_blocks(weights, sums, width, _draw(rngs))


class SamplingHead:
    """Exact full-distribution sampling in onnxruntime and numpy: directly for up to
    `small_batch` rows, by rejection from the block envelope for more.

    Direct sampling draws each row's number from that row's own generator (seeded rows
    depend on it). The envelope's trials draw from the head's own generator, all rows
    in one call: only rows without a seed come here (`sample_rows` sends seeded rows
    directly), and for those it changes nothing which generator the numbers come from,
    while a Python call per row and trial cost more than the trials' numpy work.

    Not thread-safe: one head per worker thread.
    """

    def __init__(
        self,
        vocab: int,
        intra_op_threads: int = 1,
        small_batch: int = SMALL_BATCH,
        max_trials: int = MAX_TRIALS,
        seed: int | None = None,
    ) -> None:
        import onnxruntime as ort

        from service.engine import session_options

        self.vocab = vocab
        self.width = block_width(vocab)
        self.blocks = -(-vocab // self.width)
        self.exact_blocks = min(EXACT_BLOCKS, self.blocks)
        self.small_batch = small_batch
        self.max_trials = max_trials
        starts = np.arange(self.blocks) * self.width
        self.sizes = (np.minimum(starts + self.width, vocab) - starts).astype(np.float64)
        self.envelope = ort.InferenceSession(
            envelope_graph(vocab, self.width, self.exact_blocks),
            session_options(intra_op_threads),
            providers=["CPUExecutionProvider"],
        )
        self.direct = ort.InferenceSession(
            direct_graph(vocab, self.width),
            session_options(intra_op_threads),
            providers=["CPUExecutionProvider"],
        )
        self.rng = make_rng(seed)  # the envelope's trials (see the class docstring)
        self.trials = 0  # trials run, over all rows (for measurements)
        self.fallbacks = 0  # rows that fell back to direct sampling

    def warm_up(self) -> None:
        """One call of each graph, so the first request does not pay for their set-up."""
        for rows in (1, self.small_batch + 1):
            logits = np.zeros((rows, self.vocab), np.float32)
            self.sample(logits, np.ones(rows, np.float32), [Uniforms(make_rng(0))] * rows)

    def sample(
        self,
        logits: np.ndarray,
        inv_t: np.ndarray,
        rngs: Sequence[UniformSource],
        direct: bool = False,
    ) -> np.ndarray:
        """One exact sample of softmax(logits * inv_t) per row; `direct` always directly,
        with the rows' own generators `rngs` (which the envelope does not use)."""
        rows = logits.shape[0]
        feeds = {"logits": logits, "inv_t": inv_t.reshape(rows, 1)}
        if direct or rows <= self.small_batch:
            # directly: softmax and block sums in one onnxruntime call, then the lookup
            weights, sums = self.direct.run(None, feeds)
            return pick_weighted(weights, sums, rngs)
        block_max, bound, exact, weights, mass = self.envelope.run(None, feeds)
        r = np.arange(rows)[:, None]
        envelope = bound * self.sizes  # (R, nb) float64: each block's mass or its bound
        envelope[r, exact] = mass
        slot_of = np.full((rows, self.blocks), -1, np.int64)  # the exact block's index in `exact`
        slot_of[r, exact] = np.arange(self.exact_blocks)
        cdf = np.cumsum(envelope, axis=1)
        width = self.width
        out = np.empty(rows, np.int64)
        pending = np.arange(rows)
        for _ in range(self.max_trials):
            self.trials += len(pending)
            row_cdf = cdf[pending]
            target = self.rng.random(len(pending)) * row_cdf[:, -1]
            block = np.minimum((row_cdf <= target[:, None]).sum(axis=1), self.blocks - 1)
            block_mass = envelope[pending, block]
            before = row_cdf[np.arange(len(pending)), block] - block_mass
            ok = block_mass > 0
            # the rest of the uniform number, spread over the chosen block: uniform again
            rest = np.clip((target - before) / np.where(ok, block_mass, 1.0), 0.0, 1.0 - 1e-12)
            index = np.zeros(len(pending), np.int64)
            slot = slot_of[pending, block]
            exact_rows = (slot >= 0) & ok
            if exact_rows.any():
                # an exact block: the word whose running weight passes rest * mass
                w = weights[pending[exact_rows], slot[exact_rows]]  # (E, width)
                running = np.cumsum(w, axis=1, dtype=np.float64)
                goal = rest[exact_rows] * running[:, -1]
                offset = np.minimum((running <= goal[:, None]).sum(axis=1), width - 1)
                index[exact_rows] = block[exact_rows] * width + offset
                ok[exact_rows] = w[np.arange(len(w)), offset] > 0
            bound_rows = (slot < 0) & ok
            if bound_rows.any():
                # any other block: a uniform word, kept with probability weight / bound
                p, b = pending[bound_rows], block[bound_rows]
                spread = rest[bound_rows] * self.sizes[b]
                position = np.minimum(spread.astype(np.int64), self.sizes[b].astype(np.int64) - 1)
                words = b * width + position
                keep = np.exp((logits[p, words] - block_max[p, b]) * inv_t[p])
                index[bound_rows] = words
                ok[bound_rows] = (spread - position) < keep
            out[pending[ok]] = index[ok]
            pending = pending[~ok]
            if not len(pending):
                return out
        self.fallbacks += len(pending)
        out[pending] = _sample_direct(
            logits[pending], inv_t[pending], self.rng.random(len(pending))
        )
        return out


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

    @classmethod
    def of(cls, params: list[SamplingParams]) -> RowParams:
        top_k = np.array([p.top_k for p in params], dtype=np.int64)
        greedy = np.array([p.greedy for p in params], dtype=bool)
        inv_t = np.array([1.0 if p.greedy else p.inv_temperature for p in params], np.float32)
        top_p = np.array([p.top_p for p in params], dtype=np.float64)
        seeded = np.array([p.seed is not None for p in params], dtype=bool)
        return cls(inv_t, top_k, top_p, greedy, seeded)

    @classmethod
    def concat(cls, parts: list[RowParams]) -> RowParams:
        return cls(
            inv_t=np.concatenate([p.inv_t for p in parts]),
            top_k=np.concatenate([p.top_k for p in parts]),
            top_p=np.concatenate([p.top_p for p in parts]),
            greedy=np.concatenate([p.greedy for p in parts]),
            seeded=np.concatenate([p.seeded for p in parts]),
        )


def _sample_full(
    logits: np.ndarray,
    inv_t: np.ndarray,
    rngs: Sequence[UniformSource],
    head: SamplingHead | None,
    direct: bool = False,
) -> np.ndarray:
    """Rows that sample from the whole distribution. Without a head, modifies `logits`."""
    if head is not None:
        return head.sample(logits, inv_t, rngs, direct)
    return _sample_direct(logits, inv_t, _draw(rngs))


def sample_rows(
    logits: np.ndarray,
    rows: RowParams,
    rngs: Sequence[UniformSource],
    head: SamplingHead | None = None,
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
            _draw(rngs, idx),
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
