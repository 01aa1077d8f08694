"""Each request's changes to its logits before sampling: logit_bias, bans and penalties.

OpenAI's semantics, row by row, before temperature, top-k and top-p:

    logits[j] += bias[j]                                   each logit_bias entry j
    logits[j] -= frequency * count[j] + presence * (count[j] > 0)
    logits[j]  = -inf                                      each ban (a bias of exactly BAN)

`count[j]` is how often the request has generated word j so far: in this call only, not
its prompt nor the session's earlier calls. The counts live with the slot in the runner
(`SlotAdjustments`) and start from zero when a request is loaded into it.

On the runner's plain path the changed logits are sampled as they are. On its fused path
(the model's own call computes softmax(logits / T) for a small batch) bans cost almost
nothing: a row without a seed takes its draw from the fused softmax, and a draw that
lands on a banned word is drawn again from the changed logits. That is exact: word j
comes out with probability p_j + p_banned * p_j / (1 - p_banned) = p_j / (1 - p_banned).
The rows the fused softmax cannot sample (`BatchAdjustments.unfused`) are drawn from their
changed logits in the first place: those with a bias or a penalty, which change the
whole distribution, and seeded rows with bans, which then draw exactly the numbers they
draw unfused, so their tokens never depend on what shares their batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.engine.params import SamplingParams

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

    def sole_bans(self, slots: np.ndarray) -> np.ndarray | None:
        """Each slot's one ban, -1 for none, where no slot has any other change (a decode
        run bans one word per row and changes nothing else); None otherwise."""
        if self._other[slots].any():
            return None
        bans: np.ndarray = self._sole_ban[slots]
        return bans

    def batch(self, slots: np.ndarray, seeded: np.ndarray) -> BatchAdjustments | None:
        """The changes of a batch whose row r runs in `slots[r]` (`seeded[r]`: with a seed
        of its own); None when it has none."""
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
        all_ban_rows = np.concatenate([sole_rows, np.array(ban_rows, np.int64)])
        all_ban_ids = np.concatenate([sole[sole_rows], np.array(ban_ids, np.int64)])
        unfused = np.union1d(np.array(changed, np.int64), all_ban_rows[seeded[all_ban_rows]])
        redraw = ~np.isin(all_ban_rows, unfused)
        return BatchAdjustments(
            ban_rows=all_ban_rows,
            ban_ids=all_ban_ids,
            ban_flat=all_ban_rows * self.vocab + all_ban_ids,
            bias_rows=np.array(bias_rows, np.int64),
            bias_ids=np.array(bias_ids, np.int64),
            bias=np.array(bias, np.float32),
            penalised=rows,
            penalised_slots=slots[rows],
            presence=np.array(presence, np.float32).reshape(-1, 1),
            frequency=np.array(frequency, np.float32).reshape(-1, 1),
            counts=self._counts,
            unfused=unfused,
            fused=np.setdiff1d(np.arange(len(slots)), unfused),
            redraw_rows=all_ban_rows[redraw],
            redraw_ids=all_ban_ids[redraw],
        )


@dataclass
class BatchAdjustments:
    """A batch's changes as flat arrays: one fancy-indexed operation per kind per step."""

    ban_rows: np.ndarray  # (n,) int64: row ban_rows[i] may never draw ban_ids[i]
    ban_ids: np.ndarray  # (n,) int64
    ban_flat: np.ndarray  # (n,) int64: the same in the flattened logits (one np.put)
    bias_rows: np.ndarray  # (m,) int64: bias[i] is added to (bias_rows[i], bias_ids[i])
    bias_ids: np.ndarray  # (m,) int64
    bias: np.ndarray  # (m,) float32
    penalised: np.ndarray  # (P,) int64: rows with a penalty
    penalised_slots: np.ndarray  # (P,) int64: their slots, where their counts are
    presence: np.ndarray  # (P, 1) float32
    frequency: np.ndarray  # (P, 1) float32
    counts: np.ndarray | None  # (slots, V) float32, shared with SlotAdjustments
    # a fused step: the rows drawn from their changed logits, and the others
    unfused: np.ndarray  # sorted: a bias or a penalty, or bans and a seed
    fused: np.ndarray  # sorted
    redraw_rows: np.ndarray  # the other rows' bans: a draw of redraw_ids[i] in row
    redraw_ids: np.ndarray  # redraw_rows[i] is drawn again from its changed logits

    def apply(self, logits: np.ndarray) -> None:
        """Bias, penalties, then bans, in place on the batch's logits (B, V)."""
        if len(self.bias_rows):
            logits[self.bias_rows, self.bias_ids] += self.bias
        if len(self.penalised) and self.counts is not None:
            counts = self.counts[self.penalised_slots]  # (P, V)
            logits[self.penalised] -= self.frequency * counts + self.presence * (counts > 0)
        if len(self.ban_flat):
            np.put(logits, self.ban_flat, -np.inf)

    def redrawn(self, tokens: np.ndarray) -> np.ndarray:
        """The fused rows whose draw from the fused softmax is one of their bans."""
        if not len(self.redraw_rows):
            return _EMPTY
        hits = self.redraw_rows[tokens[self.redraw_rows] == self.redraw_ids]
        return np.unique(hits) if len(hits) > 1 else hits

    def count(self, tokens: np.ndarray) -> None:
        """After a step: each penalised row has generated `tokens[row]` once more."""
        if len(self.penalised) and self.counts is not None:
            self.counts[self.penalised_slots, tokens[self.penalised]] += 1.0
