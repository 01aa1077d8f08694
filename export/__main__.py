"""Turn a training checkpoint into a verified model bundle.

    python -m export --checkpoint DIR --out BUNDLE [--opset N]

DIR is a training output folder (best.pt is used when present, else checkpoint.pt)
or a checkpoint file. The bundle appears at BUNDLE only once it is complete and its
parity checks have passed. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="training output folder or .pt file")
    parser.add_argument("--out", required=True, help="bundle folder to write")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    return parser.parse_args(argv)


def resolve_checkpoint(path: Path) -> Path:
    if path.is_dir():
        for name in ("best.pt", "checkpoint.pt"):
            if (path / name).is_file():
                return path / name
        return path / "checkpoint.pt"
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from export.bundle_writer import build_bundle
    from export.onnx_export import ExportError
    from simmer.bundle import BundleError

    try:
        checkpoint = resolve_checkpoint(Path(args.checkpoint))
        with tempfile.TemporaryDirectory() as work:
            manifest = build_bundle(checkpoint, Path(args.out), Path(work), opset=args.opset)
    except (ExportError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"bundle written to {args.out} (version {manifest['version']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
