"""The model runner: the model session, the slot arrays and the sampling head.

It executes a `StepPlan` and returns a `StepOutput`. Each running request owns a slot in
preallocated state arrays (layers, slots, hidden) and per-slot sampling parameters. A
step runs the model once over the whole batch, one token per row, and samples it at
once; a new request's feed but for its last token goes first, in a state-only call per
distinct length (`_prefill`). While the batch stays the same, each step feeds the previous
step's tokens and state straight back in (the carry); the slot arrays are written only
when requests join or leave (`flush`, then `load`).

Each slot also keeps its request's logit bias, bans and penalties, and the counts of the
words it has generated (`service.engine.adjust`, which says how a fused step samples
them). Log-probabilities are those of the changed distribution.

A decode run (`execute_run`) takes the model's `run_steps` steps in one onnxruntime
call, each sampled in the graph and fed to the next (the bundle's `decode_run`). At a
small batch the step itself is a fraction of what a step costs around it: the Python
of a pass, the hand-off to the event loop and the message it sends. A run pays those
once for `run_steps` tokens. It serves the common small batch only: up to `RUN_BATCH`
rows, each sampling its whole distribution without a seed, with at most one ban (the
server's [UNK] ban) and no other change, and none asking for logprobs or ignoring the
stop token. A seeded row takes single steps, so its tokens never depend on what shares
its batch. The engine core decides when a run may start and which of its steps count.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from service.engine.adjust import BatchAdjustments, SlotAdjustments
from service.engine.head import SMALL_BATCH, SamplingHead
from service.engine.model import ModelSession, SoftmaxOutput
from service.engine.params import Uniforms, make_rng
from service.engine.request import Request, TopLogprobs
from service.engine.sampler import RowParams, log_softmax, pick_weighted, sample_rows, top_ids
from service.engine.scheduler import StepPlan
from simmer.tokenizer import PAD_ID

logger = logging.getLogger(__name__)

# The most rows a decode run takes. Per step, the run graph costs more than step_softmax
# by 5 to 15 us a row (its lookup's small ops, and buffers for every step), and saves a
# pass's Python and hand-off, about 35 us, plus the lookup in numpy: a clear gain at 1
# to 4 rows, even at 6 to 8, a loss at 16 (783 against 552 us a step). Below 8 rows the
# event loop also sends every token as its own message (`output.COALESCE_MIN_BATCH`),
# and a run cuts those messages by its length; from 8 rows coalescing does that.
RUN_BATCH = 7


@dataclass
class StepOutput:
    tokens: np.ndarray  # (B,) int64: each row's sampled token
    h: np.ndarray  # (L, B, H): each row's state after the step; never written again
    c: np.ndarray
    top: dict[int, TopLogprobs]  # rows that asked for logprobs
    seconds: float  # wall time of the step


@dataclass
class _Rows:
    """The running batch's per-row parameters, rebuilt when the batch changes."""

    slots: np.ndarray  # (B,) int64
    params: RowParams
    logprobs: list[int]  # rows that report top words
    no_eos: list[int]  # rows that never draw the stop token
    rngs: list[Uniforms]  # each row's generator (rows without a seed share one)
    adjust: BatchAdjustments | None = None  # logit bias, bans, penalties; None: no row has any
    run_bans: np.ndarray | None = None  # (B,) each row's one ban (-1: none); None: no runs


class ModelRunner:
    def __init__(
        self,
        model: ModelSession,
        max_batch: int,
        head: SamplingHead | None,
        fuse_sampling: bool = True,
        decode_runs: bool = True,
    ) -> None:
        self.model = model
        self.head = head
        self.fuse = fuse_sampling and head is not None and model.has_softmax
        self.run_steps = model.run_steps if decode_runs else 0  # 0: a step per call
        layers, hidden = model.num_layers, model.hidden_size
        self._h = np.zeros((layers, max_batch, hidden), np.float32)
        self._c = np.zeros((layers, max_batch, hidden), np.float32)
        self._next = np.zeros(max_batch, np.int64)  # each slot's next token to feed
        self._inv_t = np.ones(max_batch, np.float32)
        self._top_k = np.zeros(max_batch, np.int64)
        self._top_p = np.ones(max_batch, np.float64)
        self._greedy = np.zeros(max_batch, bool)
        self._seeded = np.zeros(max_batch, bool)
        self._logprobs = np.zeros(max_batch, bool)
        self._no_eos = np.zeros(max_batch, bool)
        self._adjust = SlotAdjustments(max_batch, model.vocab_size)
        self._unseeded = Uniforms(make_rng(None))  # every row without a seed draws here
        self._rows: _Rows | None = None
        self._carry: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # tokens, h, c
        self.calls = 0  # model calls so far

    def flush(self) -> None:
        """Before the running set changes: write the carried state back to the slots."""
        if self._carry is not None and self._rows is not None:
            tokens, h, c = self._carry
            slots = self._rows.slots
            self._h[:, slots] = h
            self._c[:, slots] = c
            self._next[slots] = tokens[:, 0]
        self._carry = None
        self._rows = None

    def drop(self) -> None:
        """After a failed step: forget the carried state without writing it back."""
        self._carry = None
        self._rows = None

    def load(self, slot: int, request: Request) -> None:
        """Write a request's state and sampling parameters into its slot (after `flush`)."""
        params = request.params
        self._h[:, slot] = request.h
        self._c[:, slot] = request.c
        self._greedy[slot] = params.greedy
        self._inv_t[slot] = params.inv_temperature
        # k at or above the vocabulary keeps every word, as k = 0 does
        self._top_k[slot] = params.top_k if params.top_k < self.model.vocab_size else 0
        self._top_p[slot] = params.top_p
        self._seeded[slot] = params.seed is not None
        self._logprobs[slot] = params.logprobs > 0
        self._no_eos[slot] = params.ignore_eos
        self._adjust.load(slot, params)

    def execute(self, plan: StepPlan) -> StepOutput:
        """Feed every row of `plan` once and sample a token for each."""
        started = time.perf_counter()
        rows = self._rows_of(plan)
        fused: SoftmaxOutput | None = None
        if plan.prefill:
            self._prefill(plan)  # every row now feeds one token, from its slot
        feed, h_in, c_in = self._feed(rows)
        if (
            self.fuse
            and rows.params.all_whole
            and not rows.no_eos
            and len(plan.requests) <= SMALL_BATCH
        ):
            # a small batch sampling whole distributions: the softmax for direct
            # sampling runs in the model's own call (one onnxruntime call per step)
            fused = self.model.run_softmax(feed, h_in, c_in, rows.params.inv_t)
            self.calls += 1
            logits, h, c = fused.logits, fused.h, fused.c
        else:
            out = self.model.run(feed, h_in, c_in)
            self.calls += 1
            logits, h, c = out.logits, out.h, out.c
        if rows.adjust is not None:
            rows.adjust.apply(logits)
        requests = plan.requests
        logps = {
            row: log_softmax(logits[row], requests[row].params.temperature) for row in rows.logprobs
        }
        if fused is not None:
            sampled = self._pick_fused(fused, logits, rows)
        else:
            if rows.no_eos:
                logits[rows.no_eos, PAD_ID] = -np.inf
            sampled = sample_rows(logits, rows.params, rows.rngs, self.head)
        if rows.adjust is not None:
            rows.adjust.count(sampled)
        top: dict[int, TopLogprobs] = {}
        for row, logp in logps.items():
            ids = top_ids(logp, requests[row].params.logprobs)
            ids = ids[np.isfinite(logp[ids])]  # banned words are not candidates
            top[row] = TopLogprobs(float(logp[sampled[row]]), ids, logp[ids])
        self._carry = (sampled.reshape(-1, 1), h, c)
        return StepOutput(sampled, h, c, top, time.perf_counter() - started)

    def execute_run(self, plan: StepPlan) -> list[StepOutput] | None:
        """`run_steps` steps of a running batch in one call, one output per step; None,
        with nothing stepped, for a batch a run does not serve (see the module docstring)
        or one with newcomers, whose first token should not wait for a whole run."""
        if not self.run_steps or plan.prefill or len(plan.requests) > RUN_BATCH:
            return None
        rows = self._rows_of(plan)
        if rows.run_bans is None:
            return None
        started = time.perf_counter()
        feed, h_in, c_in = self._feed(rows)
        steps = self.run_steps
        # every row here is unseeded: they draw from the shared generator, in one call
        uniforms = self._unseeded.rng.random((len(rows.slots), steps))
        out = self.model.run_decode(feed, h_in, c_in, rows.params.inv_t, rows.run_bans, uniforms)
        self.calls += 1
        self._carry = (np.ascontiguousarray(out.tokens[:, -1:]), out.h[-1], out.c[-1])
        seconds = (time.perf_counter() - started) / steps
        return [StepOutput(out.tokens[:, k], out.h[k], out.c[k], {}, seconds) for k in range(steps)]

    def _feed(self, rows: _Rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the next step feeds, (B, 1) tokens and (L, B, H) state: the carry, or
        the slots once the batch has changed."""
        if self._carry is not None:
            return self._carry
        slots = rows.slots
        return self._next[slots].reshape(-1, 1), self._h[:, slots], self._c[:, slots]

    def keep(self, step: StepOutput) -> None:
        """After a run: carry on from `step`, one of its steps, as if it had been the
        last (the core drops the steps after a row ended)."""
        self._carry = (np.ascontiguousarray(step.tokens).reshape(-1, 1), step.h, step.c)

    def _pick_fused(self, fused: SoftmaxOutput, logits: np.ndarray, rows: _Rows) -> np.ndarray:
        """One token per row of a fused step: from the fused softmax, except the rows whose
        changes it does not know (see `service.engine.adjust`), drawn from their changed
        `logits`."""
        adjust = rows.adjust
        if adjust is None or not len(adjust.unfused):
            sampled = pick_weighted(fused.probs, fused.sums, rows.rngs)
            unfused = _NO_ROWS
        else:
            keep, unfused = adjust.fused, adjust.unfused
            sampled = np.zeros(len(rows.slots), np.int64)
            if len(keep):
                rngs = [rows.rngs[i] for i in keep.tolist()]
                sampled[keep] = pick_weighted(fused.probs[keep], fused.sums[keep], rngs)
        if adjust is not None:
            redrawn = adjust.redrawn(sampled)
            if len(redrawn):
                unfused = np.union1d(unfused, redrawn)
        if len(unfused):
            rngs = [rows.rngs[i] for i in unfused.tolist()]
            sampled[unfused] = sample_rows(
                logits[unfused], rows.params.take(unfused), rngs, self.head
            )
        return sampled

    def _rows_of(self, plan: StepPlan) -> _Rows:
        """The batch's row arrays, rebuilt when the running set has changed."""
        if plan.changed or self._rows is None:
            self.flush()
            slots = plan.slots
            params = RowParams(
                self._inv_t[slots],
                self._top_k[slots],
                self._top_p[slots],
                self._greedy[slots],
                self._seeded[slots],
            )
            shared = self._unseeded
            self._rows = _Rows(
                slots,
                params,
                logprobs=np.flatnonzero(self._logprobs[slots]).tolist(),
                no_eos=np.flatnonzero(self._no_eos[slots]).tolist(),
                rngs=[shared if r.rng is None else r.rng for r in plan.requests],
                adjust=self._adjust.batch(slots, self._seeded[slots]),
            )
            rows = self._rows
            if (
                self.run_steps
                and len(slots) <= RUN_BATCH
                and params.all_full
                and not rows.logprobs
                and not rows.no_eos
            ):
                rows.run_bans = self._adjust.sole_bans(slots)
        return self._rows

    def _prefill(self, plan: StepPlan) -> None:
        """New requests' feeds, but for their last token: one state-only call per
        distinct length (`run_state`: no output layer where the bundle has its prefill
        graph), straight into their slots; the last token is fed with the step's decode
        batch.

        So a step with newcomers is still one decode call over the whole batch, whose
        logits need no gathering: the old way fed whole prompts in a call of their own
        and copied both calls' logits, (B, V) floats, into one array, which cost more
        than the model under churn (a request joining nearly every step).
        """
        requests, slots = plan.requests, plan.slots
        by_length: dict[int, list[int]] = {}
        for row in plan.prefill:
            feed = requests[row].feed
            self._next[slots[row]] = feed[-1]
            if len(feed) > 1:
                by_length.setdefault(len(feed) - 1, []).append(row)
        for length, rows in by_length.items():
            group = slots[rows]
            tokens = np.array([requests[row].feed[:-1] for row in rows], dtype=np.int64)
            h, c = self.model.run_state(
                tokens.reshape(len(rows), length), self._h[:, group], self._c[:, group]
            )
            self.calls += 1
            self._h[:, group] = h
            self._c[:, group] = c


_NO_ROWS = np.zeros(0, np.int64)
