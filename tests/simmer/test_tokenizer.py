"""simmer.tokenizer: the book's word-level tokenizer, its vocabulary and its file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from simmer.tokenizer import PAD, UNK, Tokenizer

BOOK_EXAMPLE = "Recipe for Roasted Vegetables | Chop 1/4 cup."


def test_book_example_tokenizes_like_the_book() -> None:
    tokenizer = Tokenizer.train([BOOK_EXAMPLE], vocab_size=100)
    ids = tokenizer.encode(BOOK_EXAMPLE)
    words = [tokenizer.id_to_word(i) for i in ids]
    assert words == [
        "recipe", "for", "roasted", "vegetables", "|", "chop", "1", "/", "4", "cup", ".",
    ]  # fmt: skip
    assert tokenizer.decode(ids) == "recipe for roasted vegetables | chop 1/4 cup."


def test_vocabulary_keeps_the_most_frequent_words_after_pad_and_unk(tmp_path: Path) -> None:
    texts = ["stir stir stir the pot", "stir the soup", "bake"]
    tokenizer = Tokenizer.train(texts, vocab_size=4)
    assert tokenizer.vocab == [PAD, UNK, "stir", "the"]
    assert tokenizer.encode("Bake the SOUP") == [1, 3, 1]
    tokenizer.save(tmp_path / "tokenizer.json")
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert saved["vocab"] == tokenizer.vocab
    assert saved["lowercase"] is True
    assert Tokenizer.load(tmp_path / "tokenizer.json") == tokenizer


def test_tokenizer_imports_without_torch() -> None:
    code = "import sys, simmer.tokenizer; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
