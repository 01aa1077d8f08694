"""A book-size bundle for the benchmark: random weights, the book's shapes.

Speed does not depend on training, so the benchmark serves a randomly initialised
`RecipeLSTM(LSTMConfig())` (vocab 10,000, embedding 100, LSTM 128) exported through
the same path as a trained checkpoint: `export.bundle_writer.build_bundle`.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

from simmer.bundle import DECODE_RUN, GRAPHS, MANIFEST, PREFILL, SEQUENCE_LOGPROBS, is_bundle
from simmer.tokenizer import PAD, UNK, Tokenizer

# graphs a cached bundle must have, else it comes from an older export and is built again
NEWEST_GRAPHS = (SEQUENCE_LOGPROBS, DECODE_RUN, PREFILL)

# A few real words so prompts encode to something other than [UNK].
COMMON_WORDS = (
    "recipe",
    "for",
    "the",
    "a",
    "and",
    "of",
    "to",
    "in",
    "with",
    "salt",
    "pepper",
    "oil",
    "butter",
    "sugar",
    "flour",
    "water",
    "add",
    "stir",
    "heat",
    "pan",
    "bowl",
    "minutes",
    "until",
    "mix",
    "cook",
    "bake",
    "oven",
    "serve",
    "chicken",
    "onion",
    "garlic",
    "cream",
    "cheese",
    "egg",
    "eggs",
    "cup",
    "cups",
    "teaspoon",
    "tablespoon",
    "large",
    "small",
    "medium",
    "over",
    "into",
    "on",
    "at",
    "from",
    "about",
    "then",
    "place",
    "cut",
    "chop",
    "slice",
    "boil",
    "simmer",
    "season",
    "taste",
    "top",
    "remove",
    "let",
    "cool",
    "lemon",
    "juice",
)


def book_tokenizer(vocab_size: int) -> Tokenizer:
    """`vocab_size` words: padding, [UNK], punctuation, common words, then filler words."""
    words = [PAD, UNK, *string.punctuation, *COMMON_WORDS]
    seen = set(words)
    words = list(dict.fromkeys(words))
    n = 0
    while len(words) < vocab_size:
        word = f"w{n}"
        n += 1
        if word not in seen:
            words.append(word)
    return Tokenizer(words[:vocab_size])


def build_random_bundle(
    out: Path,
    vocab_size: int = 10_000,
    embedding_dim: int = 100,
    hidden_size: int = 128,
    seed: int = 0,
    int8_data: Path | None = None,
) -> Path:
    """Export a randomly initialised model of the given size to a bundle at `out`; with
    `int8_data` (a corpus for the export's loss check), its int8 variant."""
    import torch

    from export.bundle_writer import build_bundle
    from export.options import ExportOptions
    from training.checkpoint import BEST, TOKENIZER, checkpoint_payload, save_checkpoint
    from training.model import LSTMConfig, RecipeLSTM
    from training.presets import TrainConfig

    torch.manual_seed(seed)
    train_config = TrainConfig(
        vocab_size=vocab_size, embedding_dim=embedding_dim, hidden_size=hidden_size, seed=seed
    )
    config = LSTMConfig.for_training(train_config, vocab_size)
    model = RecipeLSTM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_config.lr)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        tokenizer = book_tokenizer(vocab_size)
        tokenizer.save(run / TOKENIZER)
        # an untrained run at epoch 0
        payload = checkpoint_payload(
            model, optimizer, train_config.to_dict(), tokenizer, epoch=0, history=[]
        )
        save_checkpoint(run / BEST, payload)
        work = Path(tmp) / "work"
        work.mkdir()
        options = ExportOptions(quantize="int8", data=int8_data) if int8_data else None
        build_bundle(run / BEST, out, work, options)
    return out


def cached_bundle(
    cache: Path,
    vocab_size: int = 10_000,
    embedding_dim: int = 100,
    hidden_size: int = 128,
    int8_data: Path | None = None,
) -> Path:
    """The random bundle of this size under `cache` (int8 with `int8_data`), built once,
    and again when the cached one comes from an older export (`is_current`)."""
    suffix = "-int8" if int8_data else ""
    out = cache / f"random-v{vocab_size}-e{embedding_dim}-h{hidden_size}{suffix}"
    if not is_current(out):
        build_random_bundle(out, vocab_size, embedding_dim, hidden_size, int8_data=int8_data)
    return out


def is_current(bundle: Path) -> bool:
    """Whether `bundle` is a bundle with every graph in NEWEST_GRAPHS."""
    if not is_bundle(bundle):
        return False
    try:
        manifest = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    graphs = manifest.get(GRAPHS) if isinstance(manifest, dict) else None
    return isinstance(graphs, dict) and all(name in graphs for name in NEWEST_GRAPHS)
