"""Exact full-distribution sampling with onnxruntime's help: the sampling head.

Rows that sample from the whole distribution (no top_k, no top_p) are the common case
and the expensive one. Sampling them directly needs a weight exp(l / T) for every
word, and exp over (B, V) floats costs about as much as the engine step that made the
logits. So for more than `SMALL_BATCH` rows the head samples exactly by rejection from
an envelope, computing exps for a small part of each row:

1. the vocabulary is cut into blocks of about sqrt(V) consecutive words (the
   tokenizer orders words by frequency, so a block's words have similar weights), and
   each block's largest logit M_j is taken: one pass over the logits, no exp;
2. the `exact_blocks` blocks with the largest M_j get exact weights exp((l - max) / T);
   every other block gets the bound size_j * exp((M_j - max) / T) on its mass;
3. a trial picks a block in proportion to its exact mass or its bound. In an exact
   block the word is picked by its weight and the trial succeeds; in any other block
   a word is picked uniformly and kept with probability exp((l - M_j) / T), which is
   at most 1, else the trial fails and the row tries again.

A trial returns word w with probability exp((l_w - max) / T) / W, W the same for every
word, so the result is exactly softmax(logits / T). Steps 1 and 2 are the bundle's
`sampling_envelope` graph (built at export); the trials are numpy over small arrays.
For trained models most of the mass sits in a few blocks, and for random ones every
block is flat, so most rows succeed at the first trial; a row that fails `MAX_TRIALS`
times is sampled directly, which keeps the result exact.

Up to `SMALL_BATCH` rows, and for seeded rows, the head samples directly: the bundle's
`sampling_direct` graph computes the softmax and its block sums, and only the lookup
runs in numpy. For a small decode batch the runner has the model's own step graph
compute those weights (`step_softmax`), so only the lookup runs at all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.engine.params import Uniforms, UniformSource, make_rng
from service.engine.sampler import pick_weighted, sample_direct
from simmer.bundle import ModelBundle, block_count
from simmer.ort import open_session

SMALL_BATCH = 32  # up to this many full-distribution rows, the head samples directly
MAX_TRIALS = 8  # envelope trials before a row is sampled directly

logger = logging.getLogger(__name__)


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
        envelope: Any,
        direct: Any,
        width: int,
        exact_blocks: int,
        small_batch: int = SMALL_BATCH,
        max_trials: int = MAX_TRIALS,
        seed: int | None = None,
    ) -> None:
        """`envelope` and `direct` are onnxruntime sessions of the bundle's
        sampling_envelope and sampling_direct graphs for this vocabulary, whose blocks
        are `width` words wide."""
        self.vocab = vocab
        self.width = width
        self.blocks = block_count(vocab, self.width)
        self.exact_blocks = exact_blocks
        self.small_batch = small_batch
        self.max_trials = max_trials
        starts = np.arange(self.blocks) * self.width
        self.sizes = (np.minimum(starts + self.width, vocab) - starts).astype(np.float64)
        self.envelope = envelope
        self.direct = direct
        self.rng = make_rng(seed)  # the envelope's trials (see the class docstring)
        self.trials = 0  # trials run, over all rows (for measurements)
        self.fallbacks = 0  # rows that fell back to direct sampling

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, intra_op_threads: int = 1) -> SamplingHead | None:
        """The head over the bundle's sampling graphs, warmed up; None where the bundle
        has none or they cannot be opened (the runner then samples in numpy)."""
        envelope, direct = bundle.graph("sampling_envelope"), bundle.graph("sampling_direct")
        if envelope is None or direct is None:
            logger.warning("the bundle has no sampling graphs; sampling in numpy")
            return None
        try:
            head = cls(
                bundle.vocab_size,
                open_session(envelope.path, intra_op_threads),
                open_session(direct.path, intra_op_threads),
                envelope.width,
                int(envelope.params["exact_blocks"]),
            )
            head.warm_up()
        except Exception:  # onnxruntime raises its own types; numpy sampling still works
            logger.warning("sampling head unavailable; sampling in numpy", exc_info=True)
            return None
        return head

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
        out[pending] = sample_direct(logits[pending], inv_t[pending], self.rng.random(len(pending)))
        return out
