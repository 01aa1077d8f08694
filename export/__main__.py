"""Turn a training checkpoint into a verified model bundle.

    python -m export --checkpoint DIR --out BUNDLE [--data PATH] [--quantize int8] [--opset N]

DIR is a training output folder (best.pt is used when present, else checkpoint.pt)
or a checkpoint file. Only tensors and plain containers are read from it: a checkpoint
holding any other Python object is refused, since unpickling it could run its code.

--data is the corpus the checkpoint was trained on: its held-out recipes are the real
text for the parity checks and the validation loss (without it, parity uses sentences
of vocabulary words). --quantize int8 needs --data, and refuses a graph whose
validation loss worsens by more than --max-quant-loss-increase unless --force is given.

The bundle appears at BUNDLE only once it is complete and every check has passed; an
existing bundle there is replaced, any other existing folder is left alone. Errors
print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from export.options import ExportOptions

DEFAULTS = ExportOptions()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="training output folder or .pt file")
    parser.add_argument("--out", required=True, help="bundle folder to write")
    parser.add_argument("--data", type=Path, help="the training corpus, for held-out recipes")
    parser.add_argument("--quantize", choices=["int8"], help="write a dynamically quantised graph")
    parser.add_argument(
        "--opset", type=int, default=DEFAULTS.opset, help=f"ONNX opset (default {DEFAULTS.opset})"
    )
    parser.add_argument(
        "--max-quant-loss-increase",
        type=float,
        default=DEFAULTS.max_quant_loss_increase,
        help="largest int8 validation-loss increase accepted "
        f"(default {DEFAULTS.max_quant_loss_increase})",
    )
    parser.add_argument(
        "--force", action="store_true", help="write an int8 bundle past that threshold"
    )
    parser.add_argument(
        "--val-recipes",
        type=int,
        default=DEFAULTS.val_recipes,
        help=f"held-out recipes scored for the validation loss (default {DEFAULTS.val_recipes})",
    )
    args = parser.parse_args(argv)
    if args.max_quant_loss_increase < 0:
        parser.error("--max-quant-loss-increase must be at least 0")
    if args.val_recipes < 1:
        parser.error("--val-recipes must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from export.bundle_writer import build_bundle
    from export.onnx_export import ExportError
    from simmer.bundle import BundleError
    from training.checkpoint import CheckpointError, resolve

    options = ExportOptions(
        opset=args.opset,
        quantize=args.quantize,
        data=args.data,
        max_quant_loss_increase=args.max_quant_loss_increase,
        force=args.force,
        val_recipes=args.val_recipes,
    )
    try:
        checkpoint = resolve(args.checkpoint)
        with tempfile.TemporaryDirectory(prefix="simmer-export-") as work:
            manifest = build_bundle(checkpoint, Path(args.out), Path(work), options)
    except (CheckpointError, ExportError, BundleError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"bundle written to {args.out} (version {manifest['version']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
