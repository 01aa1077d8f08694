"""Train the book's recipe LSTM.

    python -m training --data PATH --out DIR [--preset tiny|quick|book] [--epochs N] [--max-recipes N]

Writes DIR/checkpoint.pt (latest), DIR/best.pt (best validation loss),
DIR/tokenizer.json and DIR/metrics.json. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import sys

from training.data import CorpusError, load_corpus
from training.presets import PRESETS, get_preset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="corpus: Epicurious/Wikibooks JSON, JSONL or text")
    parser.add_argument("--out", required=True, help="output folder for checkpoints and metrics")
    parser.add_argument("--preset", default="quick", help=f"one of {', '.join(PRESETS)}")
    parser.add_argument("--epochs", type=int, help="override the preset's epoch count")
    parser.add_argument("--max-recipes", type=int, help="use only the first N documents")
    parser.add_argument("--seed", type=int, help="override the preset's seed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = get_preset(args.preset).with_overrides(
            epochs=args.epochs, max_recipes=args.max_recipes, seed=args.seed
        )
        if config.epochs < 1:
            raise ValueError("--epochs must be at least 1")
        texts = load_corpus(args.data, config.max_recipes)
    except (CorpusError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from training.train import train

    bar: tqdm | None = None

    def progress(batch: int, total: int, stats: dict[str, float]) -> None:
        nonlocal bar
        if bar is None or batch == 1:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, unit="batch", file=sys.stderr, leave=False)
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{stats['tokens_per_s']:,.0f}")

    train(texts, config, args.out, progress=progress)
    if bar is not None:
        bar.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
