"""Torch vs onnxruntime checks, run on the graph that will be shipped before a bundle is written.

Each check raises ExportError with one line when it fails and returns the figures it
measured for the manifest:

- parity: logits and states agree with torch within 1e-4 (max abs), on random tokens
  and states and on real text from a zero state, for several batch sizes and lengths;
- incremental: one token at a time, carrying (hn, cn) into (h0, c0), ends where one
  pass over the whole sequence ends (1e-5);
- batch independence: each row gives the same result alone as in a batch (1e-5);
- greedy: 50 greedy tokens from torch and from onnxruntime are identical.

The torch side is a `Reference`. For an int8 graph it is `export.quantize.Int8Reference`,
and its logits are compared after the quantised output layer is applied to
onnxruntime's own last hidden state: a 1e-7 difference in h may move a value across an
int8 rounding boundary, so logits computed from torch's h would differ by one
quantisation step for reasons that are not errors. The states are still compared with
torch's, and h[-1] is the only input of the output layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from export.onnx_export import ExportError
from training.model import LSTMConfig

PARITY_TOL = 1e-4
STEP_TOL = 1e-5
GREEDY_TOKENS = 50
RANDOM_CASES = ((1, 1), (3, 7), (8, 32))  # (batch, seq)
TEXT_CASES = ((1, 64), (4, 16), (16, 1), (16, 40))
SEED = 0

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Batch-1 torch steps are fastest on one thread, and do not spin against other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Reference:
    """The torch model the graph must agree with.

    `model(tokens, (h, c))` returns logits (B, T, V) and the state, like RecipeLSTM.
    `head`, when given, maps a hidden state (B, H) to logits; the graph's logits are
    then checked against `head` of onnxruntime's last hidden state (see above).
    """

    model: nn.Module
    config: LSTMConfig
    head: Callable[[torch.Tensor], torch.Tensor] | None = None

    @torch.no_grad()
    @torch_threads(1)
    def run(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> Arrays:
        logits, (hn, cn) = self.model(
            torch.from_numpy(tokens), (torch.from_numpy(h), torch.from_numpy(c))
        )
        return logits[:, -1].numpy(), hn.numpy(), cn.numpy()

    @torch.no_grad()
    def expected_logits(self, torch_logits: np.ndarray, onnx_hidden: np.ndarray) -> np.ndarray:
        if self.head is None:
            return torch_logits
        return self.head(torch.from_numpy(onnx_hidden)).numpy()


def run_graph(
    session: ort.InferenceSession, tokens: np.ndarray, h: np.ndarray, c: np.ndarray
) -> Arrays:
    logits, hn, cn = session.run(None, {"tokens": tokens, "h0": h, "c0": c})
    return logits, hn, cn


def zero_state(config: LSTMConfig, batch: int) -> tuple[np.ndarray, np.ndarray]:
    shape = (config.num_layers, batch, config.hidden_size)
    return np.zeros(shape, np.float32), np.zeros(shape, np.float32)


def random_state(
    config: LSTMConfig, batch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    shape = (config.num_layers, batch, config.hidden_size)
    h = np.tanh(rng.standard_normal(shape)).astype(np.float32)  # h = o * tanh(c) lies in (-1, 1)
    c = (rng.standard_normal(shape) * 2).astype(np.float32)
    return h, c


def text_batch(texts: Sequence[Sequence[int]], batch: int, seq: int) -> np.ndarray:
    """(batch, seq) int64 from the first `batch` token lists (cycled), cut or padded with 0."""
    rows = np.zeros((batch, seq), np.int64)
    for row in range(batch):
        ids = list(texts[row % len(texts)])[:seq]
        rows[row, : len(ids)] = ids
    return rows


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def check_parity(
    reference: Reference, session: ort.InferenceSession, texts: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """Torch vs onnxruntime on random tokens and states, and on real text from zero."""
    config = reference.config
    rng = np.random.default_rng(SEED)
    cases: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    for batch, seq in RANDOM_CASES:
        tokens = rng.integers(0, config.vocab_size, (batch, seq), dtype=np.int64)
        cases.append(("random", tokens, *random_state(config, batch, rng)))
    for batch, seq in TEXT_CASES:
        cases.append(("text", text_batch(texts, batch, seq), *zero_state(config, batch)))
    worst = {"random": [0.0, 0.0], "text": [0.0, 0.0]}  # logits, state
    for kind, tokens, h, c in cases:
        ref_logits, ref_h, ref_c = reference.run(tokens, h, c)
        logits, hn, cn = run_graph(session, tokens, h, c)
        expected = reference.expected_logits(ref_logits, hn[-1])
        errors = (_max_abs(logits, expected), max(_max_abs(hn, ref_h), _max_abs(cn, ref_c)))
        worst[kind] = [max(w, e) for w, e in zip(worst[kind], errors, strict=True)]
        if max(errors) > PARITY_TOL:
            raise ExportError(
                f"parity failed on {kind} input {list(tokens.shape)}: torch and onnxruntime "
                f"differ by {errors[0]:.2e} in logits, {errors[1]:.2e} in state "
                f"(tolerance {PARITY_TOL:g})"
            )
    return {
        "tolerance": PARITY_TOL,
        "cases": [f"{kind} {t.shape[0]}x{t.shape[1]}" for kind, t, _, _ in cases],
        "max_abs_logits_random": worst["random"][0],
        "max_abs_state_random": worst["random"][1],
        "max_abs_logits_text": worst["text"][0],
        "max_abs_state_text": worst["text"][1],
    }


def check_incremental(
    session: ort.InferenceSession, config: LSTMConfig, texts: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """One token at a time with the state carried == one pass, from zero and from a random state."""
    rng = np.random.default_rng(SEED + 1)
    tokens = text_batch(texts, 4, 24)
    worst = 0.0
    for h0, c0 in (zero_state(config, 4), random_state(config, 4, rng)):
        whole = run_graph(session, tokens, h0, c0)
        h, c = h0, c0
        for t in range(tokens.shape[1]):
            logits, h, c = run_graph(session, tokens[:, t : t + 1], h, c)
        error = max(_max_abs(a, b) for a, b in zip(whole, (logits, h, c), strict=True))
        worst = max(worst, error)
        if error > STEP_TOL:
            raise ExportError(
                f"incremental check failed: stepping {tokens.shape[1]} tokens one at a time "
                f"differs from one pass by {error:.2e} (tolerance {STEP_TOL:g})"
            )
    return {"tolerance": STEP_TOL, "tokens": int(tokens.shape[1]), "max_abs": worst}


def check_batch_independence(session: ort.InferenceSession, config: LSTMConfig) -> dict[str, Any]:
    """Each row of a batch gives the result it gives alone, and in reversed order."""
    rng = np.random.default_rng(SEED + 2)
    batch, seq = 8, 9
    tokens = rng.integers(0, config.vocab_size, (batch, seq), dtype=np.int64)
    h, c = random_state(config, batch, rng)
    together = run_graph(session, tokens, h, c)
    flipped = run_graph(session, tokens[::-1].copy(), h[:, ::-1].copy(), c[:, ::-1].copy())
    worst = 0.0
    for row in range(batch):
        alone = run_graph(session, tokens[row : row + 1], h[:, row : row + 1], c[:, row : row + 1])
        mirror = batch - 1 - row
        for i, single in enumerate(alone):
            axis = 0 if i == 0 else 1  # logits (B, V); states (L, B, H)
            worst = max(
                worst,
                _max_abs(np.take(together[i], [row], axis=axis), single),
                _max_abs(np.take(flipped[i], [mirror], axis=axis), single),
            )
    if worst > STEP_TOL:
        raise ExportError(
            f"batch independence failed: a row's result changes with the other rows by {worst:.2e} "
            f"(tolerance {STEP_TOL:g})"
        )
    return {"tolerance": STEP_TOL, "batch": batch, "max_abs": worst}


def check_greedy(
    reference: Reference, session: ort.InferenceSession, prompts: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """GREEDY_TOKENS greedy tokens per prompt: torch one prompt at a time, onnxruntime batched."""
    config = reference.config
    length = min(len(p) for p in prompts)
    tokens = np.array([list(p)[:length] for p in prompts], np.int64)
    expected: list[list[int]] = []
    with torch.no_grad(), torch_threads(1):
        for row in tokens:
            logits, state = reference.model(torch.from_numpy(row[None, :]))
            out: list[int] = []
            for _ in range(GREEDY_TOKENS):
                out.append(int(torch.argmax(logits[0, -1])))
                logits, state = reference.model(torch.tensor([[out[-1]]]), state)
            expected.append(out)
    logits, h, c = run_graph(session, tokens, *zero_state(config, len(prompts)))
    got: list[list[int]] = [[] for _ in prompts]
    for _ in range(GREEDY_TOKENS):
        step = np.argmax(logits, axis=1)
        for row, token in enumerate(step):
            got[row].append(int(token))
        logits, h, c = run_graph(session, step[:, None].astype(np.int64), h, c)
    for row, (want, have) in enumerate(zip(expected, got, strict=True)):
        if want != have:
            at = next(i for i, (a, b) in enumerate(zip(want, have, strict=True)) if a != b)
            raise ExportError(
                f"greedy decode differs for prompt {row} at token {at}: torch {want[at]}, "
                f"onnxruntime {have[at]}"
            )
    return {"prompts": len(prompts), "tokens": GREEDY_TOKENS, "identical": True}


def run_checks(
    reference: Reference,
    session: ort.InferenceSession,
    texts: Sequence[Sequence[int]],
    prompts: Sequence[Sequence[int]],
) -> dict[str, Any]:
    """Every check above, in order; the first failure raises ExportError."""
    return {
        "torch_vs_onnxruntime": check_parity(reference, session, texts),
        "incremental": check_incremental(session, reference.config, texts),
        "batch_independence": check_batch_independence(session, reference.config),
        "greedy": check_greedy(reference, session, prompts),
    }
