"""Corpus loaders and training windows.

Three formats, each read into a list of texts in the book's recipe format:

- the Kaggle Epicurious `full_format_recipes.json` (a list of recipes with `title`
  and `directions`; other fields ignored; recipes without a title or directions dropped);
- the Wikibooks Cookbook JSON (a dict keyed "Cookbook:<Title>", each with `title` and
  `steps`);
- plain text or JSONL, one document per line (JSONL lines are strings or objects with
  a `text` field, or recipes in either schema above).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from simmer.tokenizer import PAD_ID, Tokenizer, format_recipe


class CorpusError(ValueError):
    """A corpus that cannot be read; the message is one line."""


def _clean(items: Any) -> list[str]:
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list):
        return []
    return [s.strip() for s in items if isinstance(s, str) and s.strip()]


def recipe_text(record: Any) -> str | None:
    """The book's text for one recipe record in either schema, or None to drop it."""
    if not isinstance(record, dict):
        return None
    title = record.get("title")
    if not isinstance(title, str) or not title.strip():
        return None
    directions = _clean(record.get("directions", record.get("steps")))
    if not directions:
        return None
    return format_recipe(title.strip(), directions)


def _from_json(data: Any) -> list[str]:
    if isinstance(data, dict):  # Wikibooks: {"Cookbook:Title": {...}, ...}
        records: Iterable[Any] = data.values()
    elif isinstance(data, list):  # Epicurious
        records = data
    else:
        raise CorpusError("JSON corpus must be a list of recipes or a dict of recipes")
    return [text for text in map(recipe_text, records) if text is not None]


def _from_lines(lines: Iterable[str], jsonl: bool) -> list[str]:
    texts = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        if not jsonl:
            texts.append(line)
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"line {number} is not valid JSON: {exc.msg}") from exc
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            texts.append(item["text"])
        elif (text := recipe_text(item)) is not None:
            texts.append(text)
    return texts


def load_corpus(path: str | Path, max_recipes: int | None = None) -> list[str]:
    """Read a corpus file in any supported format; raise CorpusError with one line."""
    file = Path(path)
    if not file.is_file():
        raise CorpusError(f"corpus file not found: {file}")
    try:
        raw = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"corpus is not UTF-8 text: {file}") from exc
    except OSError as exc:
        raise CorpusError(f"cannot read corpus {file}: {exc.strerror}") from exc
    suffix = file.suffix.lower()
    if suffix == ".json":
        try:
            texts = _from_json(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise CorpusError(f"malformed JSON in {file}: {exc.msg} at line {exc.lineno}") from exc
    else:
        texts = _from_lines(raw.splitlines(), jsonl=suffix in (".jsonl", ".ndjson"))
    if max_recipes is not None:
        texts = texts[:max_recipes]
    if not texts:
        raise CorpusError(f"no usable documents in {file} after filtering")
    return texts


def encode_windows(texts: list[str], tokenizer: Tokenizer, seq_len: int = 200) -> np.ndarray:
    """The first `seq_len + 1` tokens of each text, padded with 0: int64 (N, seq_len + 1).

    Inputs are `[:, :-1]` and targets `[:, 1:]`. A text shorter than the window ends in
    padding, and the first pad after its last word is the stop target.
    """
    windows = np.full((len(texts), seq_len + 1), PAD_ID, dtype=np.int64)
    for row, text in enumerate(texts):
        ids = tokenizer.encode(text)[: seq_len + 1]
        windows[row, : len(ids)] = ids
    return windows


def tail_windows(
    texts: list[str], tokenizer: Tokenizer, seq_len: int = 200, burn_in: int = 25
) -> tuple[np.ndarray, np.ndarray]:
    """A second window for each text whose stop falls outside its first window.

    Returns int64 (M, seq_len + 1) windows, each the text's last `seq_len` tokens and
    then the stop (pad), and int64 (M,) `count_from`: the first target index that
    counts. Targets before it are context: the first `burn_in` (the window starts from
    a zero state in mid-recipe) and those the text's first window already counts.
    """
    rows: list[list[int]] = []
    count_from: list[int] = []
    for text in texts:
        ids = tokenizer.encode(text)
        if len(ids) <= seq_len:  # the first window holds the stop target already
            continue
        start = len(ids) - seq_len  # the window is ids[start:] + [stop]
        rows.append([*ids[start:], PAD_ID])
        # target t is ids[start + 1 + t]; the first window counts ids[1 .. seq_len]
        count_from.append(max(burn_in, seq_len - start))
    windows = np.array(rows, dtype=np.int64).reshape(len(rows), seq_len + 1)
    return windows, np.array(count_from, dtype=np.int64)


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and validation indices: a fixed-seed random `val_fraction` of the n texts.

    At least one text stays on each side when `val_fraction > 0` and there are two or more.
    """
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n > 1:
        n_val = max(1, min(n - 1, n_val))
    return np.sort(order[n_val:]), np.sort(order[:n_val])
