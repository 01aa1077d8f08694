"""A trained bundle for the benchmark's realistic run, built once per corpus and preset.

    trained_bundle(cache / "bench-bundles", corpus)  # -> .../trained-<sha12>-book-<p8>-e1

The headline serves random weights, whose generations almost never stop early; a
trained model's do, so its load looks like a real one. The bundle is made the way a
user makes one, with `python -m training` and then `python -m export`, each in a
process of its own, inside a temporary folder beside the cache entry. Only a finished
bundle is renamed into place, so a run stopped half-way leaves nothing to reuse.

The cache key is what decides the weights' shape and the text they learnt: the
corpus's sha256, the preset's name and a hash of its settings (a changed preset trains
anew), the epochs and the recipe limit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.model import is_current
from bench.server import ROOT
from simmer.bundle import sha256_file
from training.presets import get_preset

OUTPUT_TAIL = 3000  # characters of a failed command's output kept in its error


class TrainedBundleError(RuntimeError):
    """Training or export failed; the message ends with the tail of its output."""


def trained_bundle(
    cache_dir: Path,
    data: Path,
    preset: str = "book",
    epochs: int = 1,
    max_recipes: int | None = None,
) -> Path:
    """The bundle of `preset` trained for `epochs` on `data` (its first `max_recipes`
    recipes), from `cache_dir` when it is there from the current export (`is_current`),
    else trained and exported into it."""
    out = cache_dir / cache_name(data, preset, epochs, max_recipes)
    if is_current(out):
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=cache_dir) as tmp:
        run, bundle = Path(tmp) / "run", Path(tmp) / "bundle"
        train = ["--data", str(data), "--out", str(run), "--preset", preset]
        train += ["--epochs", str(epochs)]
        if max_recipes is not None:
            train += ["--max-recipes", str(max_recipes)]
        _run_module("training", train)
        _run_module("export", ["--checkpoint", str(run), "--out", str(bundle), "--data", str(data)])
        if out.exists():  # not a bundle, or an older export's: nothing in it to keep
            shutil.rmtree(out)
        try:
            bundle.rename(out)  # one step on the same file system: never half there
        except OSError:
            if not is_current(out):  # another benchmark run may have finished first
                raise
    return out


def cache_name(data: Path, preset: str, epochs: int, max_recipes: int | None) -> str:
    """`trained-<sha12>-<preset>-<settings8>-e<epochs>`, with `-r<max_recipes>` when
    limited; an unknown preset raises ValueError naming the known ones."""
    settings = json.dumps(get_preset(preset).to_dict(), sort_keys=True).encode()
    limit = "" if max_recipes is None else f"-r{max_recipes}"
    tag = hashlib.sha256(settings).hexdigest()[:8]
    return f"trained-{sha256_file(data)[:12]}-{preset}-{tag}-e{epochs}{limit}"


def _run_module(module: str, args: list[str]) -> None:
    """`python -m module *args`; a non-zero exit raises with the end of its output."""
    command = [sys.executable, "-m", module, *args]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr)[-OUTPUT_TAIL:]
        raise TrainedBundleError(
            f"`python -m {module} {' '.join(args)}` exited with {proc.returncode}:\n{output}"
        )
