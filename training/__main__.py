"""Train the book's recipe LSTM.

    python -m training --data PATH --out DIR [--preset tiny|quick|book|book-plain]
        [--epochs N] [--max-recipes N] [--seed N] [--lr LR] [--batch-size N]
        [--device auto|cpu|cuda] [--resume]

Writes DIR/checkpoint.pt (latest epoch), DIR/best.pt (best validation loss),
DIR/tokenizer.json, DIR/metrics.json and, at the end, DIR/loss.png. --resume continues
DIR/checkpoint.pt on the same corpus (only --epochs may change, to train longer).

Data-parallel on N processes (gloo on the CPU, NCCL on CUDA); only rank 0 writes:

    torchrun --nproc_per_node=N -m training --data PATH --out DIR ...

Bad input (a missing or malformed corpus, nothing left after filtering, an unknown
preset, an unusable checkpoint) prints one line, exits 2 and writes nothing.

Related: `python -m training.fetch` (the default corpus), `python -m training.next_words`
(the next-word table of a checkpoint), `python -m training.speed` (throughput check).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from training.data import CorpusError, load_corpus
from training.malloc import reuse_freed_memory
from training.presets import PRESETS, TrainConfig, get_preset

if TYPE_CHECKING:
    from training.train import Progress

DEFAULT_PRESET = "quick"
# With --resume the run keeps its saved settings; these flags would change them.
FIXED_ON_RESUME = ("preset", "seed", "lr", "batch_size", "max_recipes")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors, like every other error here, are one line on stderr and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m training", description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--data", required=True, help="corpus: Epicurious or Wikibooks JSON, JSONL or text"
    )
    parser.add_argument("--out", required=True, help="output folder for checkpoints and metrics")
    parser.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    parser.add_argument("--epochs", type=int, help="override the preset's epoch count")
    parser.add_argument("--max-recipes", type=int, help="use only the first N documents")
    parser.add_argument("--seed", type=int, help="override the preset's seed")
    parser.add_argument("--lr", type=float, help="override the preset's peak learning rate")
    parser.add_argument("--batch-size", type=int, help="override the preset's batch (per process)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--resume", action="store_true", help="continue DIR/checkpoint.pt")
    return parser.parse_args(argv)


def is_rank_zero() -> bool:
    # torchrun names each process's rank in its environment; a plain run has none.
    return os.environ.get("RANK", "0") == "0"


def fail(message: str) -> int:
    if is_rank_zero():
        print(f"error: {message}", file=sys.stderr)
    return 2


def fresh_config(args: argparse.Namespace) -> TrainConfig:
    return get_preset(args.preset or DEFAULT_PRESET).with_overrides(
        epochs=args.epochs,
        max_recipes=args.max_recipes,
        seed=args.seed,
        lr=args.lr,
        batch_size=args.batch_size,
    )


def progress_bar() -> tuple[Progress, Any]:
    """A tqdm bar per epoch showing the running loss and tokens/s; and its closer."""
    from tqdm import tqdm

    bars: list[Any] = []

    def progress(batch: int, total: int, stats: dict[str, float]) -> None:
        if batch == 1:
            close()
            bars.append(tqdm(total=total, unit="batch", file=sys.stderr, leave=False, disable=None))
        bars[-1].update(1)
        bars[-1].set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{stats['tokens_per_s']:,.0f}")

    def close() -> None:
        while bars:
            bars.pop().close()

    return progress, close


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    payload: dict[str, Any] | None = None
    try:
        if args.resume:
            given = [
                "--" + name.replace("_", "-")
                for name in FIXED_ON_RESUME
                if getattr(args, name) is not None
            ]
            if given:
                raise ValueError(f"--resume keeps the run's settings; drop {', '.join(given)}")
            from training.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint
            from training.train import resume_config

            try:
                payload = load_checkpoint(os.path.join(args.out, CHECKPOINT))
                config = resume_config(payload, args.epochs)
            except CheckpointError as exc:
                raise ValueError(str(exc)) from exc
            except (TypeError, KeyError) as exc:
                raise ValueError(f"checkpoint has an unusable train_config: {exc}") from exc
        else:
            config = fresh_config(args)
        texts = load_corpus(args.data, config.max_recipes)
    except (CorpusError, ValueError) as exc:
        return fail(str(exc))

    from training.checkpoint import CHECKPOINT, CheckpointError
    from training.train import start_runtime, stop_runtime, train

    try:
        runtime = start_runtime(args.device)
    except ValueError as exc:
        return fail(str(exc))
    if payload is None and os.path.isfile(os.path.join(args.out, CHECKPOINT)):
        runtime.log(
            f"note: {args.out} holds a checkpoint; the first epoch replaces it "
            "(--resume continues it instead)"
        )
    progress, close = progress_bar()
    finished = False
    try:
        train(texts, config, args.out, progress, resume=payload, runtime=runtime)
        finished = True
    except CheckpointError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        close()
        runtime.log(f"interrupted; {args.out}/{CHECKPOINT} holds the last finished epoch")
        return 130
    finally:
        close()
        stop_runtime(runtime, finished)
    return 0


if __name__ == "__main__":
    reuse_freed_memory()  # a process-wide malloc setting: for the program, not for importers
    sys.exit(main())
