"""Each request's changes to its logits before sampling: logit_bias, bans and penalties.

OpenAI's semantics, row by row, before temperature, top-k and top-p:

    logits[j] += bias[j]                                   each logit_bias entry j
    logits[j] -= frequency * count[j] + presence * (count[j] > 0)
    logits[j]  = -inf                                      each ban (a bias of exactly BAN)

`count[j]` is how often the request has generated word j so far: in this call only, not
its prompt nor the session's earlier calls. The counts live with the slot in the runner
(`SlotAdjustments`) and start from zero when a request is loaded into it.

Bans cost little on every path: a -inf in the logits, or, where the model's own call
computed the softmax (the runner's fused path), a zero weight and its block's sum
recomputed. A bias or a penalty changes the whole distribution, so a row that has one
takes its weights from its changed logits (the sampling head or numpy), never from the
fused softmax; nor does a row whose bans leave under `MIN_MASS` of its fused softmax
(in float32 the words it has left may have underflowed to zero there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.engine.params import SamplingParams

MIN_MASS = 1e-6  # a fused row its bans leave less of is sampled from its logits instead
_EMPTY = np.zeros(0, np.int64)


@dataclass(frozen=True)
class _SlotChanges:
    """One request's changes, as `SlotAdjustments.batch` gathers them."""

    bans: list[int]
    bias_ids: list[int]
    bias: list[float]
    presence: float
    frequency: float

    @property
    def penalised(self) -> bool:
        return self.presence != 0.0 or self.frequency != 0.0

    @property
    def changes_logits(self) -> bool:
        return bool(self.bias_ids) or self.penalised


class SlotAdjustments:
    """Per slot of the runner: its request's bias, bans and penalties, and the counts of
    the words that request has generated (allocated with the first penalised request).

    A request whose only change is one ban (the server's [UNK] ban, say: the common
    case) is kept as that id alone, so a batch of them is gathered without a Python
    loop over its rows."""

    def __init__(self, max_batch: int, vocab: int) -> None:
        self.vocab = vocab
        self._slots: list[_SlotChanges | None] = [None] * max_batch
        self._sole_ban = np.full(max_batch, -1, np.int64)  # the one ban, where that is all
        self._other = np.zeros(max_batch, bool)  # slots with changes in `_slots`
        self._counts: np.ndarray | None = None  # (max_batch, V) float32

    def load(self, slot: int, params: SamplingParams) -> None:
        """The changes of the request now in `slot`; its counts start at zero."""
        self._slots[slot] = None
        self._sole_ban[slot] = -1
        self._other[slot] = False
        bans = list(params.bans)
        biased = [(token, value) for token, value in params.logit_bias if token not in bans]
        changes = _SlotChanges(
            bans,
            [token for token, _ in biased],
            [value for _, value in biased],
            params.presence_penalty,
            params.frequency_penalty,
        )
        if not changes.changes_logits and len(bans) <= 1:
            if bans:
                self._sole_ban[slot] = bans[0]
            return
        self._slots[slot] = changes
        self._other[slot] = True
        if changes.penalised:
            if self._counts is None:
                self._counts = np.zeros((len(self._slots), self.vocab), np.float32)
            self._counts[slot] = 0.0

    def batch(self, slots: np.ndarray) -> BatchAdjustments | None:
        """The changes of a batch whose row r runs in `slots[r]`; None when it has none."""
        sole = self._sole_ban[slots]
        sole_rows = np.flatnonzero(sole >= 0)
        other_rows = np.flatnonzero(self._other[slots])
        if not len(sole_rows) and not len(other_rows):
            return None
        ban_rows: list[int] = []
        ban_ids: list[int] = []
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias: list[float] = []
        penalised: list[int] = []
        presence: list[float] = []
        frequency: list[float] = []
        changed: list[int] = []
        for row in other_rows.tolist():
            changes = self._slots[int(slots[row])]
            assert changes is not None
            ban_rows.extend([row] * len(changes.bans))
            ban_ids.extend(changes.bans)
            bias_rows.extend([row] * len(changes.bias_ids))
            bias_ids.extend(changes.bias_ids)
            bias.extend(changes.bias)
            if changes.penalised:
                penalised.append(row)
                presence.append(changes.presence)
                frequency.append(changes.frequency)
            if changes.changes_logits:
                changed.append(row)
        rows = np.array(penalised, np.int64)
        return BatchAdjustments(
            ban_rows=np.concatenate([sole_rows, np.array(ban_rows, np.int64)]),
            ban_ids=np.concatenate([sole[sole_rows], np.array(ban_ids, np.int64)]),
            bias_rows=np.array(bias_rows, np.int64),
            bias_ids=np.array(bias_ids, np.int64),
            bias=np.array(bias, np.float32),
            penalised=rows,
            penalised_slots=slots[rows],
            presence=np.array(presence, np.float32).reshape(-1, 1),
            frequency=np.array(frequency, np.float32).reshape(-1, 1),
            counts=self._counts,
            changed=np.array(changed, np.int64),
        )


@dataclass
class _FusedBans:
    """Where a batch's bans fall in a fused softmax of blocks `width` words wide."""

    rows: np.ndarray  # (K,) int64: the (row, block) pairs that hold a ban, unique
    blocks: np.ndarray  # (K,) int64
    columns: np.ndarray  # (K, width) int64: each pair's words
    banned: np.ndarray  # rows with a ban, sorted


@dataclass
class BatchAdjustments:
    """A batch's changes as flat arrays: one fancy-indexed operation per kind per step."""

    ban_rows: np.ndarray  # (n,) int64: row ban_rows[i] may never draw ban_ids[i]
    ban_ids: np.ndarray  # (n,) int64
    bias_rows: np.ndarray  # (m,) int64: bias[i] is added to (bias_rows[i], bias_ids[i])
    bias_ids: np.ndarray  # (m,) int64
    bias: np.ndarray  # (m,) float32
    penalised: np.ndarray  # (P,) int64: rows with a penalty
    penalised_slots: np.ndarray  # (P,) int64: their slots, where their counts are
    presence: np.ndarray  # (P, 1) float32
    frequency: np.ndarray  # (P, 1) float32
    counts: np.ndarray | None  # (slots, V) float32, shared with SlotAdjustments
    changed: np.ndarray  # rows with a bias or a penalty, sorted
    _fused: _FusedBans | None = None  # worked out at the first fused step

    def apply(self, logits: np.ndarray) -> None:
        """Bias, penalties, then bans, in place on the batch's logits (B, V)."""
        if len(self.bias_rows):
            logits[self.bias_rows, self.bias_ids] += self.bias
        if len(self.penalised) and self.counts is not None:
            counts = self.counts[self.penalised_slots]  # (P, V)
            logits[self.penalised] -= self.frequency * counts + self.presence * (counts > 0)
        if len(self.ban_rows):
            logits[self.ban_rows, self.ban_ids] = -np.inf

    def ban_weights(self, weights: np.ndarray, sums: np.ndarray) -> np.ndarray:
        """Zero the banned words' weights in a fused softmax (B, nb * width), recompute
        their blocks' sums (B, nb), and return the rows left with under MIN_MASS."""
        if not len(self.ban_rows):
            return _EMPTY
        fused = self._fused
        if fused is None:
            blocks = sums.shape[1]
            width = weights.shape[1] // blocks
            pairs = np.unique(self.ban_rows * blocks + self.ban_ids // width)
            rows, block = np.divmod(pairs, blocks)
            columns = block[:, None] * width + np.arange(width)
            fused = self._fused = _FusedBans(rows, block, columns, np.unique(rows))
        weights[self.ban_rows, self.ban_ids] = 0.0
        sums[fused.rows, fused.blocks] = weights[fused.rows[:, None], fused.columns].sum(axis=1)
        left = sums[fused.banned].sum(axis=1)
        low: np.ndarray = fused.banned[left < MIN_MASS]
        return low

    def count(self, tokens: np.ndarray) -> None:
        """After a step: each penalised row has generated `tokens[row]` once more."""
        if len(self.penalised) and self.counts is not None:
            self.counts[self.penalised_slots, tokens[self.penalised]] += 1.0
