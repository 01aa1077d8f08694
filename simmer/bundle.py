"""The model bundle: the contract between export and serving.

A bundle is a folder holding:

- `model.onnx`: inputs `tokens` int64 [batch, seq], `h0`/`c0` float32
  [layers, batch, hidden]; outputs `logits` float32 [batch, vocab] for the last
  position, and `hn`/`cn`, the state after the last position;
- `tokenizer.json`: the word-level tokenizer (see `simmer.tokenizer`);
- `manifest.json`: what the model is, how it was made and checked, and the sha256 of
  every other file.

`write_bundle` makes a bundle appear whole or not at all; `load_bundle` checks every
hash, then the graph's inputs and outputs against the manifest and the tokenizer, before
anything is used, and refuses a bundle with a one-line reason.

The manifest's keys: `name`, `version`, `model` (`vocab_size`, `embedding_dim`,
`hidden_size`, `num_layers`), `graph` (`opset`, `precision`), `versions`, `training`,
`parity`, `runtime` (`graph_optimization`, `session_graph_optimization_level`), for an
int8 bundle `quantization`, and `files` (name -> sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simmer.tokenizer import Tokenizer, TokenizerError

MANIFEST = "manifest.json"
MODEL = "model.onnx"
TOKENIZER = "tokenizer.json"
FORMAT = "simmer-bundle"
FORMAT_VERSION = 1
REQUIRED_FILES = (MODEL, TOKENIZER)
GRAPH_INPUTS = ("tokens", "h0", "c0")
GRAPH_OUTPUTS = ("logits", "hn", "cn")

Shape = tuple[int | str | None, ...]


class BundleError(ValueError):
    """A bundle that cannot be written or used; the message is one line."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


@dataclass(frozen=True)
class ModelBundle:
    """A verified bundle on disk."""

    path: Path
    manifest: dict[str, Any]
    tokenizer: Tokenizer

    @property
    def model_path(self) -> Path:
        return self.path / MODEL

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", "simmer-lstm"))

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", "unknown"))

    @property
    def model_hash(self) -> str:
        return str(self.manifest["files"][MODEL])

    @property
    def num_layers(self) -> int:
        return int(self.manifest["model"]["num_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["model"]["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["model"]["vocab_size"])

    @property
    def precision(self) -> str:
        """The graph's precision: fp32, or int8 for a quantised graph."""
        return str(self.manifest.get("graph", {}).get("precision", "fp32"))


def graph_shapes(model_path: str | Path) -> dict[str, Shape]:
    """Input and output shapes of an ONNX graph, read with onnxruntime (no torch, no onnx).

    Dimensions are ints, names of dynamic axes ("batch"), or None.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BundleError(f"onnxruntime cannot load {model_path}: {reason}") from exc
    return {arg.name: tuple(arg.shape) for arg in [*session.get_inputs(), *session.get_outputs()]}


def check_graph(
    shapes: Mapping[str, Shape], vocab_size: int, hidden_size: int, num_layers: int
) -> None:
    """Raise BundleError unless the graph has the bundle's inputs, outputs and sizes."""
    for name in (*GRAPH_INPUTS, *GRAPH_OUTPUTS):
        if name not in shapes:
            raise BundleError(f"{MODEL} has no {name!r}")
    expected: dict[str, tuple[int | None, ...]] = {
        "tokens": (None, None),
        "logits": (None, vocab_size),
        **{name: (num_layers, None, hidden_size) for name in ("h0", "c0", "hn", "cn")},
    }
    for name, dims in expected.items():
        shape = shapes[name]
        what = "vocabulary size" if name == "logits" else "shape"
        if len(shape) != len(dims):
            raise BundleError(f"{MODEL} {name} has {len(shape)} dimensions, expected {len(dims)}")
        for got, want in zip(shape, dims, strict=True):
            if want is not None and got != want:
                raise BundleError(
                    f"{what} disagrees: {MODEL} {name} is {list(shape)}, "
                    f"the bundle says {[d if d is not None else '?' for d in dims]}"
                )


def load_bundle(path: str | Path) -> ModelBundle:
    """Read and verify a bundle: every listed file present with its recorded sha256, and
    a graph whose vocabulary, hidden size and layers agree with the manifest and tokenizer.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle folder not found: {root}")
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"not a bundle (no {MANIFEST}): {root}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{MANIFEST} is not valid JSON: {root / MANIFEST}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST} is not a simmer bundle manifest: {root / MANIFEST}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"{MANIFEST} has no file hashes: {root / MANIFEST}")
    for name in REQUIRED_FILES:
        if name not in files:
            raise BundleError(f"{MANIFEST} does not list {name}")
    for name, expected in files.items():
        file = root / name
        if not isinstance(expected, str):
            raise BundleError(f"{MANIFEST} has no sha256 for {name}")
        if Path(name).name != name or name == MANIFEST:
            raise BundleError(f"{MANIFEST} lists a file outside the bundle: {name!r}")
        if not file.is_file():
            raise BundleError(f"bundle file missing: {file}")
        actual = sha256_file(file)
        if actual != expected:
            raise BundleError(
                f"sha256 mismatch for {file}: manifest {expected[:12]}…, file {actual[:12]}…"
            )
    try:
        tokenizer = Tokenizer.load(root / TOKENIZER)
    except TokenizerError as exc:
        raise BundleError(f"bad tokenizer in bundle: {exc}") from exc
    model = manifest.get("model")
    if not isinstance(model, dict):
        raise BundleError(f"{MANIFEST} has no model section")
    for key in ("vocab_size", "hidden_size", "num_layers"):
        if not isinstance(model.get(key), int):
            raise BundleError(f"{MANIFEST} model.{key} is missing")
    if model["vocab_size"] != tokenizer.vocab_size:
        raise BundleError(
            f"vocabulary size disagrees: manifest {model['vocab_size']}, "
            f"tokenizer {tokenizer.vocab_size}"
        )
    check_graph(
        graph_shapes(root / MODEL), model["vocab_size"], model["hidden_size"], model["num_layers"]
    )
    return ModelBundle(path=root, manifest=manifest, tokenizer=tokenizer)


def check_replaceable(out: str | Path) -> None:
    """BundleError unless `out` is free, an empty folder, or a bundle (which may be replaced)."""
    target = Path(out)
    if target.exists() and not (
        target.is_dir() and (is_bundle(target) or not any(target.iterdir()))
    ):
        raise BundleError(f"refusing to overwrite {target}: it exists and is not a bundle")


def write_bundle(
    out: str | Path, files: Mapping[str, str | Path | bytes], manifest: Mapping[str, Any]
) -> Path:
    """Write a bundle atomically: it appears at `out` only once complete.

    `files` maps bundle names to source paths or bytes; their hashes are added to the
    manifest. An existing bundle at `out` is replaced; any other existing, non-empty
    folder is refused and left as it was.
    """
    target = Path(out)
    check_replaceable(target)
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise BundleError(f"a bundle needs {', '.join(missing)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    staging.chmod(0o755)
    try:
        hashes: dict[str, str] = {}
        for name, source in files.items():
            dest = staging / name
            if isinstance(source, bytes):
                dest.write_bytes(source)
            else:
                shutil.copyfile(source, dest)
            hashes[name] = sha256_file(dest)
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": hashes}
        (staging / MANIFEST).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
        for entry in staging.iterdir():
            with open(entry, "rb") as handle:
                os.fsync(handle.fileno())
        load_bundle(staging)  # never publish a bundle that would not load
        if target.exists():
            retired = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent)
            )
            os.replace(target, retired / "bundle")
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
