"""Print the most likely next words after a prompt, at several temperatures.

    python -m training.next_words --checkpoint DIR [--prompt TEXT] [--top-k 10]
        [--temperatures 1.0 0.5 0.2]

The book's Figure 5-10: with a low temperature the distribution sharpens towards the
most likely word. DIR is a training folder (best.pt, else checkpoint.pt) or a .pt file.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_PROMPT = "recipe for roasted vegetables | chop 1 /"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.next_words", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--checkpoint", required=True, help="training folder or .pt file")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"default {DEFAULT_PROMPT!r}")
    parser.add_argument("--top-k", type=int, default=10, help="words to show (default 10)")
    parser.add_argument(
        "--temperatures", type=float, nargs="+", default=[1.0, 0.5, 0.2], help="default 1.0 0.5 0.2"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.top_k < 1 or any(not t > 0 for t in args.temperatures):
        print("error: --top-k must be at least 1 and temperatures positive", file=sys.stderr)
        return 2
    from training.checkpoint import CheckpointError, load_model, load_tokenizer, resolve
    from training.sampling import top_next_words

    try:
        path = resolve(args.checkpoint)
        model, payload = load_model(path)
        tokenizer = load_tokenizer(path, payload)
        tables = {
            t: top_next_words(model, tokenizer, args.prompt, t, args.top_k)
            for t in args.temperatures
        }
    except (CheckpointError, ValueError) as exc:  # CheckpointError: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"prompt: {args.prompt!r}  ({path}, epoch {payload['epoch']})")
    for temperature, table in tables.items():
        print(f"\ntemperature {temperature}:")
        for word, p in table:
            print(f"  {word or '<stop>':<16} {p:7.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
