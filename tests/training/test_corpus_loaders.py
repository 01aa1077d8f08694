"""Corpus loaders, windows of tokens and the train/validation split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simmer.tokenizer import Tokenizer
from training.data import CorpusError, encode_windows, load_corpus, split_train_val, tail_windows

# Invented recipes, in the Kaggle Epicurious schema (with the fields a loader ignores).
INVENTED: list[dict[str, Any]] = [
    {
        "title": "Toast With Jam",
        "directions": ["Toast the bread.", "Spread 1/4 cup jam on top."],
        "ingredients": ["2 slices bread", "1/4 cup jam"],
        "categories": ["Breakfast"],
        "rating": 3.75,
        "calories": 210.0,
        "desc": None,
    },
    {
        "title": "Buttered Peas ",
        "directions": ["1. Boil the peas for 3 minutes.", "2. Drain; add butter!"],
        "date": "2004-08-20T04:00:00.000Z",
    },
    {"title": "Lonely Title", "directions": []},
    {"title": "No Directions At All"},
    {"title": "Null Directions", "directions": None},
    {"title": "", "directions": ["Stir."]},
    {"directions": ["Whisk the eggs."]},
    {"title": "Blank Steps", "directions": ["  ", ""]},
]
INVENTED_KEPT = [
    "Recipe for Toast With Jam | Toast the bread. Spread 1/4 cup jam on top.",
    "Recipe for Buttered Peas | 1. Boil the peas for 3 minutes. 2. Drain; add butter!",
]


def test_epicurious_loader_formats_and_drops_unusable_recipes(write_json: Any) -> None:
    assert load_corpus(write_json("full_format_recipes.json", INVENTED)) == INVENTED_KEPT


def test_wikibooks_loader_reads_the_dict_keyed_by_page(write_json: Any) -> None:
    path = write_json(
        "recipes_en-us.json",
        {
            "Cookbook:Plain Rice": {
                "title": "Plain Rice",
                "category": "Rice recipes",
                "ingredients": ["1 cup rice", "2 cups water"],
                "steps": ["Rinse the rice.", "Simmer for 18 minutes (covered)."],
            },
            "Cookbook:Empty": {"title": "Empty", "ingredients": ["air"], "steps": []},
        },
    )
    assert load_corpus(path) == [
        "Recipe for Plain Rice | Rinse the rice. Simmer for 18 minutes (covered)."
    ]


def test_text_loader_takes_one_document_per_nonblank_line(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("Recipe for Tea | Boil water.\n\n  Recipe for Ice | Freeze water.  \n")
    assert load_corpus(path) == ["Recipe for Tea | Boil water.", "Recipe for Ice | Freeze water."]


def test_jsonl_loader_takes_strings_text_fields_and_recipes(tmp_path: Path) -> None:
    lines = [
        json.dumps("Recipe for Tea | Boil water."),
        json.dumps({"text": "Recipe for Ice | Freeze water."}),
        json.dumps({"title": "Jam", "directions": ["Boil fruit", "with sugar."]}),
        json.dumps({"title": "Dropped", "directions": []}),
    ]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert load_corpus(path, max_recipes=3) == [
        "Recipe for Tea | Boil water.",
        "Recipe for Ice | Freeze water.",
        "Recipe for Jam | Boil fruit with sugar.",
    ]
    assert load_corpus(path, max_recipes=1) == ["Recipe for Tea | Boil water."]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("recipes.json", '[{"title": "Tea", "directions": ["Boil."]', "malformed JSON"),
        ("recipes.json", '[{"title": "Tea", "directions": []}]', "no usable documents"),
        ("recipes.json", "42", "must be a list"),
        ("recipes.jsonl", '"ok"\n{bad\n', "line 2 is not valid JSON"),
        ("recipes.txt", "\n \n", "no usable documents"),
    ],
)
def test_bad_corpora_raise_one_line_errors(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CorpusError, match=message) as info:
        load_corpus(path)
    assert "\n" not in str(info.value)


def test_missing_corpus_is_a_corpus_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(tmp_path / "nowhere.json")


def test_windows_keep_the_first_201_tokens_and_pad_short_recipes() -> None:
    long_text = "Recipe for Soup | " + " ".join(f"w{i}" for i in range(300))
    texts = [long_text, "Recipe for Tea | Boil."]
    tokenizer = Tokenizer.train(texts, vocab_size=1000)
    windows = encode_windows(texts, tokenizer, seq_len=200)
    assert windows.shape == (2, 201)
    assert windows.dtype == np.int64
    assert windows[0].tolist() == tokenizer.encode(long_text)[:201]
    short = tokenizer.encode(texts[1])
    assert windows[1, : len(short)].tolist() == short
    assert not windows[1, len(short) :].any()
    x, y = windows[:, :-1], windows[:, 1:]
    assert (x[:, 1:] == y[:, :-1]).all()


def test_tail_windows_end_each_long_recipe_with_its_stop_and_count_only_new_targets() -> None:
    def recipe(words: int) -> str:
        return "Recipe for Soup | " + " ".join(f"w{i}" for i in range(words))

    texts = [recipe(600), recipe(10), recipe(205), recipe(196)]
    tokenizer = Tokenizer.train(texts, vocab_size=1000)
    lengths = [len(tokenizer.encode(t)) for t in texts]
    assert lengths[2] > 200 >= lengths[3]  # 205 words outrun the window; 196 fit with the stop
    windows, count_from = tail_windows(texts, tokenizer, seq_len=200, burn_in=25)
    assert windows.shape == (2, 201) and windows.dtype == np.int64  # the 600- and 205-word ones
    for row, text in zip(range(2), (texts[0], texts[2]), strict=True):
        ids = tokenizer.encode(text)
        assert windows[row].tolist() == [*ids[-200:], 0]  # the last 200 tokens, then the stop
    # 600 words: far past the first window, so only the burn-in is context
    assert count_from[0] == 25
    # 205 words: the first window already counts all but the last few targets and the stop
    start = lengths[2] - 200
    assert count_from[1] == 200 - start
    targets = windows[1, 1:]
    assert targets[count_from[1] :].tolist() == [*tokenizer.encode(texts[2])[201:], 0]
    assert tail_windows(texts[1:2], tokenizer)[0].shape == (0, 201)  # none needed


def test_validation_split_is_ten_percent_fixed_by_seed_and_disjoint() -> None:
    train_a, val_a = split_train_val(1000, 0.1, seed=42)
    train_b, val_b = split_train_val(1000, 0.1, seed=42)
    _, val_c = split_train_val(1000, 0.1, seed=7)
    assert len(val_a) == 100
    assert len(train_a) == 900
    assert np.array_equal(val_a, val_b)
    assert np.array_equal(train_a, train_b)
    assert not np.array_equal(val_a, val_c)
    assert set(train_a.tolist()).isdisjoint(val_a.tolist())
    assert sorted([*train_a.tolist(), *val_a.tolist()]) == list(range(1000))
