"""The text the export checks against, and the loss of a step graph on it.

With `--data PATH` (the corpus the checkpoint was trained on), the text is the training
run's validation split, rebuilt from the checkpoint's train_config (max_recipes,
val_fraction, seed): the same recipes the training job held out. The split is trusted
as held out only if a tokenizer trained on the rest reproduces the checkpoint's
tokenizer exactly; otherwise the manifest says `held_out: false`.

Without `--data`, parity uses sentences of vocabulary words ("recipe for ..."), drawn
with the corpus's frequency ranking, and there is no validation loss (so no int8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.onnx_export import ExportError
from simmer.tokenizer import PAD_ID, Tokenizer
from training.data import CorpusError, encode_windows, load_corpus, split_train_val

VOCAB_SENTENCES = 16
VOCAB_SENTENCE_WORDS = 60
LOSS_BATCH = 64


@dataclass(frozen=True)
class TextSample:
    """Token windows for the checks: int64 (N, seq_len + 1), padded with 0."""

    windows: np.ndarray
    source: str  # "data" or "vocabulary"
    record: dict[str, Any] = field(default_factory=dict)

    def token_lists(self) -> list[list[int]]:
        """Each window without its trailing padding."""
        return [
            [int(t) for t in row[: int(np.count_nonzero(row))]] or [PAD_ID] for row in self.windows
        ]


def vocabulary_sentences(tokenizer: Tokenizer, count: int = VOCAB_SENTENCES) -> TextSample:
    """Sentences of vocabulary words, frequent words more often (Zipf over the vocabulary order)."""
    rng = np.random.default_rng(0)
    words = tokenizer.vocab[2:]  # no padding, no [UNK]
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    texts = []
    for _ in range(count):
        picked = rng.choice(len(words), VOCAB_SENTENCE_WORDS, p=weights)
        texts.append("recipe for " + " ".join(words[i] for i in picked))
    windows = encode_windows(texts, tokenizer, VOCAB_SENTENCE_WORDS + 2)
    return TextSample(windows, "vocabulary", {"source": "vocabulary", "texts": count})


def held_out_recipes(
    data: Path, payload: dict[str, Any], tokenizer: Tokenizer, limit: int
) -> TextSample:
    """Up to `limit` recipes of the checkpoint's validation split of `data`."""
    config = payload.get("train_config") or {}
    try:
        texts = load_corpus(data, config.get("max_recipes"))
    except CorpusError as exc:
        raise ExportError(f"--data: {exc}") from exc
    seq_len = int(config.get("seq_len", 200))
    if "val_fraction" in config and "seed" in config:
        train_idx, val_idx = split_train_val(
            len(texts), float(config["val_fraction"]), int(config["seed"])
        )
        held_out = (
            len(val_idx) > 0
            and Tokenizer.train((texts[i] for i in train_idx), tokenizer.vocab_size).vocab
            == tokenizer.vocab
        )
        chosen = val_idx if len(val_idx) else np.arange(len(texts))
    else:  # a checkpoint without its training config: no way to know the split
        held_out, chosen = False, np.arange(len(texts))
    chosen = chosen[:limit]
    windows = encode_windows([texts[i] for i in chosen], tokenizer, seq_len)
    record = {
        "source": "data",
        "path": str(data),
        "recipes": len(chosen),
        "seq_len": seq_len,
        "held_out": bool(held_out),
    }
    return TextSample(windows, "data", record)


def graph_loss(
    session: ort.InferenceSession, windows: np.ndarray, num_layers: int, hidden: int
) -> float:
    """Mean cross-entropy of next-token prediction, as training's validation loss computes it
    (targets after every word, the stop token included; padding after it ignored), by
    stepping the graph one token at a time with the state carried, as the service does."""
    total, count = 0.0, 0
    for start in range(0, len(windows), LOSS_BATCH):
        batch = windows[start : start + LOSS_BATCH]
        x, y = batch[:, :-1], batch[:, 1:]
        h = np.zeros((num_layers, len(batch), hidden), np.float32)
        c = np.zeros_like(h)
        last = int(np.flatnonzero((x != PAD_ID).any(axis=0)).max(initial=-1)) + 1
        for t in range(last):
            logits, h, c = session.run(None, {"tokens": x[:, t : t + 1], "h0": h, "c0": c})
            keep = x[:, t] != PAD_ID
            if not keep.any():
                continue
            rows = logits[keep]  # (K, V)
            top = rows.max(axis=1)
            logsumexp = top + np.log(np.exp(rows - top[:, None]).sum(axis=1, dtype=np.float64))
            total += float((logsumexp - rows[np.arange(len(rows)), y[keep, t]]).sum())
            count += int(keep.sum())
    if count == 0:
        raise ExportError("the validation text has no tokens to score")
    return total / count


def prompts_from(sample: TextSample, count: int = 3, length: int = 8) -> list[list[int]]:
    """Greedy-decode prompts: the first `length` tokens of the first `count` texts."""
    lists = [ids for ids in sample.token_lists() if len(ids) >= length][:count]
    return [ids[:length] for ids in lists] or [ids[:1] for ids in sample.token_lists()[:count]]


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
