"""The book's word-level tokenizer, without Keras and without torch.

Chapter 5 of *Generative Deep Learning* prepares text by padding every ASCII
punctuation character with spaces, lowercasing, and splitting on whitespace. The
vocabulary holds the most frequent words, with "" (padding, which is also the stop
token) at id 0 and "[UNK]" at id 1.

Decoding joins words with spaces and then undoes the padding where a reader would
expect it: no space before ". , ; : ) ! ?", none after "(", and "1 / 4" reads "1/4".
Every rule looks only at earlier tokens, so text streamed one token at a time joins up
to exactly the text of a full decode.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from simmer.files import atomic_write_json

PAD = ""
UNK = "[UNK]"
PAD_ID = 0
UNK_ID = 1
FORMAT = "simmer-word-level"
FORMAT_VERSION = 1

_UNK_LOWER = UNK.lower()
_PUNCT_RE = re.compile(f"([{re.escape(string.punctuation)}])")
_SPACES_RE = re.compile(r"\s+")

# Tokens written straight after the previous word.
_NO_SPACE_BEFORE = frozenset(".,;:)!?%")
# Tokens after which the next word follows without a space.
_NO_SPACE_AFTER = frozenset("($")
_CONTRACTIONS = frozenset({"s", "t", "ll", "re", "ve", "d", "m"})


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used."""


def pad_punctuation(text: str) -> str:
    """The book's `pad_punctuation`: a space either side of each punctuation mark."""
    return _SPACES_RE.sub(" ", _PUNCT_RE.sub(r" \1 ", text)).strip()


def split_words(text: str) -> list[str]:
    """Standardise like the book (lowercase, padded punctuation) and split on whitespace.

    A literal "[UNK]", as decoding writes it, stays one word, so that decoded text
    encodes back to the same ids.
    """
    lowered = text.lower()
    if _UNK_LOWER not in lowered:
        return pad_punctuation(lowered).split()
    words: list[str] = []
    for number, part in enumerate(lowered.split(_UNK_LOWER)):
        if number:
            words.append(UNK)
        words.extend(pad_punctuation(part).split())
    return words


def format_recipe(title: str, directions: Sequence[str]) -> str:
    """The book's training text: "Recipe for <title> | <directions joined by spaces>"."""
    return "Recipe for " + title + " | " + " ".join(directions)


def _attaches(prev2: str | None, prev: str, word: str) -> bool:
    """True when `word` is written straight after `prev` with no space between them."""
    if word in _NO_SPACE_BEFORE or prev in _NO_SPACE_AFTER:
        return True
    if word == "/" and prev.isdigit():
        return True
    if prev == "/" and word.isdigit() and prev2 is not None and prev2.isdigit():
        return True
    if word == "-" and prev.isalnum():
        return True
    if prev == "-" and word.isalnum() and prev2 is not None and prev2.isalnum():
        return True
    if word == "'" and prev.isalpha():
        return True
    return prev == "'" and word in _CONTRACTIONS and prev2 is not None and prev2.isalpha()


def join_piece(prev2: str | None, prev: str | None, word: str) -> str:
    """The text that `word` adds after `prev2 prev`: the word, with a space or without."""
    if word == PAD:
        return ""
    if prev is None or prev == PAD or _attaches(prev2, prev, word):
        return word
    return " " + word


def detokenize(words: Sequence[str], context: Sequence[str] = ()) -> str:
    """Readable text for `words`, written after up to two `context` words already shown."""
    history: list[str | None] = [None, None, *context[-2:]]
    pieces = []
    for word in words:
        pieces.append(join_piece(history[-2], history[-1], word))
        history.append(word)
    return "".join(pieces)


@dataclass
class Tokenizer:
    """Word-level tokenizer: a vocabulary list whose index is the token id."""

    vocab: list[str]
    lowercase: bool = True
    punctuation: str = string.punctuation
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.vocab) < 2 or self.vocab[0] != PAD or self.vocab[1] != UNK:
            raise TokenizerError('vocabulary must start with "" and "[UNK]"')
        if len(set(self.vocab)) != len(self.vocab):
            raise TokenizerError("vocabulary has duplicate entries")
        self._index = {word: i for i, word in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 10_000) -> Tokenizer:
        """Keep the `vocab_size - 2` most frequent words; ties go alphabetically."""
        if vocab_size < 3:
            raise TokenizerError("vocab_size must be at least 3")
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(split_words(text))
        counts.pop(UNK, None)  # never a vocabulary word of its own
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        words = [word for word, _ in ranked[: vocab_size - 2]]
        return cls([PAD, UNK, *words])

    def encode(self, text: str) -> list[int]:
        index = self._index
        return [index.get(word, UNK_ID) for word in split_words(text)]

    def id_to_word(self, token_id: int) -> str:
        return self.vocab[token_id]

    def decode(self, ids: Sequence[int], context: Sequence[int] = ()) -> str:
        """Text for `ids`; `context` is the ids already shown before them (for spacing)."""
        return detokenize([self.vocab[i] for i in ids], [self.vocab[i] for i in context])

    def piece(self, prev: int | None, last: int | None, token_id: int) -> str:
        """The text one streamed token adds after the tokens `prev`, `last` (oldest first,
        as `join_piece` takes its words; None where the context is shorter)."""
        vocab = self.vocab
        return join_piece(
            None if prev is None else vocab[prev],
            None if last is None else vocab[last],
            vocab[token_id],
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "lowercase": self.lowercase,
            "punctuation": self.punctuation,
            "pad_id": PAD_ID,
            "unk_id": UNK_ID,
            "vocab_size": self.vocab_size,
            "vocab": self.vocab,
        }

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: object) -> Tokenizer:
        if not isinstance(data, dict) or not isinstance(data.get("vocab"), list):
            raise TokenizerError('tokenizer file has no "vocab" list')
        if data.get("format", FORMAT) != FORMAT:
            raise TokenizerError(f"unknown tokenizer format {data.get('format')!r}")
        if not data.get("lowercase", True) or data.get("punctuation", string.punctuation) != (
            string.punctuation
        ):
            raise TokenizerError("only the book's lowercase, ASCII-punctuation rules are supported")
        vocab = data["vocab"]
        if not all(isinstance(word, str) for word in vocab):
            raise TokenizerError("vocabulary entries must be strings")
        return cls(list(vocab))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise TokenizerError(f"tokenizer file not found: {path}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"tokenizer file is not valid JSON: {path}") from exc
        return cls.from_dict(data)
