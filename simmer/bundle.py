"""The model bundle: the contract between export and serving.

A bundle is a folder holding:

- `model.onnx`: inputs `tokens` int64 [batch, seq], `h0`/`c0` float32
  [layers, batch, hidden]; outputs `logits` float32 [batch, vocab] for the last
  position, and `hn`/`cn`, the state after the last position;
- `tokenizer.json`: the word-level tokenizer (see `simmer.tokenizer`);
- `manifest.json`: what the model is, how it was made and checked, and the sha256 of
  every other file;
- optionally, the other graphs the service runs, built and checked at export (a bundle
  without them still loads; the service then samples in numpy). Each cuts the
  vocabulary into `blocks` blocks of `width` consecutive words (the last one padded):
  - `step_softmax.onnx`: model.onnx plus an input `inv_t` float32 [batch, 1] and
    outputs `weights` float32 [batch, blocks * width] = softmax(logits * inv_t), 0 past
    the vocabulary, and `sums` float32 [batch, blocks], their block sums;
  - `sampling_direct.onnx`: `logits` [batch, vocab], `inv_t` -> `weights`, `sums`, as
    above, for logits computed elsewhere;
  - `sampling_envelope.onnx`: `logits`, `inv_t` -> `block_max` [batch, blocks] (each
    block's largest logit), `bound` [batch, blocks] = exp((block_max - max) * inv_t),
    `exact` int64 [batch, exact_blocks] (the blocks with the largest block_max,
    largest first), `weights` [batch, exact_blocks, width] = exp((logit - max) * inv_t)
    of their words (0 past the vocabulary) and `mass` [batch, exact_blocks], their sums;
  - `decode_run.onnx`: several decode steps, each sampled, in one call: model.onnx's
    inputs plus `inv_t` float32 [batch, 1], `ban` int64 [batch, 1] (a word the row never
    draws, -1 for none) and `uniforms` float64 [batch, steps] (one number in [0, 1) per
    row and step) -> `sampled` int64 [batch, steps], and `hs`/`cs` float32 [steps,
    layers, batch, hidden], the state after each step. Step k feeds the token step k - 1
    sampled (step 0 the given tokens) and draws from softmax(logits * inv_t) with
    uniforms[:, k]. Its params add `steps`;
  - `prefill.onnx`: model.onnx without its output layer: the same inputs -> `hn`/`cn`
    alone, for feeding a prompt whose logits nobody reads. It has no params;
  - `sequence_logprobs.onnx`, the scoring graph: model.onnx's inputs -> `logprobs`
    float32 [batch, seq, vocab], the log-softmax over the vocabulary after every
    position (not only the last), and `hn`/`cn`. It has no params. Echo scoring reads it
    (`service.engine.scoring`); a bundle without it serves, with scoring unavailable.

`write_bundle` makes a bundle appear whole or not at all; `load_bundle` checks every
hash, then each graph's inputs and outputs against the manifest and the tokenizer, before
anything is used, and refuses a bundle with a one-line reason.

The manifest's keys: `name`, `version`, `model` (`vocab_size`, `embedding_dim`,
`hidden_size`, `num_layers`), `graph` (`opset`, `precision`), `versions`, `training`,
`parity`, `runtime` (`graph_optimization`, `session_graph_optimization_level`), for an
int8 bundle `quantization`, `files` (name -> sha256 of model.onnx and tokenizer.json)
and, when the bundle has the other graphs, `graphs`: graph name -> `file`, `sha256`,
`inputs` and `outputs` (tensor name -> shape, a list of sizes and dynamic axis names
such as "batch"), `params` (`width`, `blocks`, for the envelope `exact_blocks`, for
decode_run `steps`; none for `prefill` and `sequence_logprobs`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
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
GRAPHS = "graphs"  # the manifest key of the other graphs
STEP_SOFTMAX = "step_softmax"
SAMPLING_DIRECT = "sampling_direct"
SAMPLING_ENVELOPE = "sampling_envelope"
SEQUENCE_LOGPROBS = "sequence_logprobs"
DECODE_RUN = "decode_run"
PREFILL = "prefill"
GRAPH_PARAMS: dict[str, tuple[str, ...]] = {
    STEP_SOFTMAX: ("width", "blocks"),
    SAMPLING_DIRECT: ("width", "blocks"),
    SAMPLING_ENVELOPE: ("width", "blocks", "exact_blocks"),
    DECODE_RUN: ("width", "blocks", "steps"),
    SEQUENCE_LOGPROBS: (),
    PREFILL: (),
}

Shape = tuple[int | str | None, ...]
Dims = tuple[int | None, ...]  # an expected shape; None: any size


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


def block_width(vocab: int) -> int:
    """Words per block of the sampling graphs: the square root of the vocabulary size,
    rounded up."""
    return max(1, math.isqrt(vocab - 1) + 1) if vocab > 1 else 1


def block_count(vocab: int, width: int) -> int:
    """Blocks of `width` words that cover `vocab` words (the last one padded)."""
    return -(-vocab // width)


@dataclass(frozen=True)
class TensorSpec:
    """What a graph input or output must be: an element type and sizes (None: any)."""

    dtype: str  # "float32", "float64" or "int64"
    dims: Dims


@dataclass(frozen=True)
class GraphInfo:
    """One of the bundle's other graphs, verified: its file, what it takes and gives, and
    the parameters it was built with (see the module docstring)."""

    name: str
    path: Path
    sha256: str
    inputs: Mapping[str, Shape]
    outputs: Mapping[str, Shape]
    params: Mapping[str, int]

    @property
    def width(self) -> int:
        return self.params["width"]

    @property
    def blocks(self) -> int:
        return self.params["blocks"]


@dataclass(frozen=True)
class ModelBundle:
    """A verified bundle on disk."""

    path: Path
    manifest: dict[str, Any]
    tokenizer: Tokenizer
    graphs: Mapping[str, GraphInfo] = field(default_factory=dict)  # the other graphs, verified

    @property
    def model_path(self) -> Path:
        return self.path / MODEL

    def graph(self, name: str) -> GraphInfo | None:
        """The verified graph `name` (STEP_SOFTMAX, SAMPLING_DIRECT, SAMPLING_ENVELOPE,
        DECODE_RUN, PREFILL, SEQUENCE_LOGPROBS), or None for a bundle exported without it."""
        return self.graphs.get(name)

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


_ELEMENT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
}


@dataclass(frozen=True)
class GraphIO:
    """A graph's inputs and outputs as onnxruntime reads them: name -> (dtype, shape)."""

    inputs: dict[str, tuple[str, Shape]]
    outputs: dict[str, tuple[str, Shape]]

    def shapes(self) -> dict[str, Shape]:
        return {name: shape for name, (_, shape) in {**self.inputs, **self.outputs}.items()}


def graph_io(model: str | Path | bytes) -> GraphIO:
    """Inputs and outputs of an ONNX graph (a file or its bytes), read with onnxruntime (no
    torch, no onnx). Dimensions are ints, names of dynamic axes ("batch"), or None."""
    from simmer.ort import GraphLoadError, open_session

    try:
        session = open_session(
            model if isinstance(model, bytes) else Path(model), level="ORT_DISABLE_ALL"
        )
    except GraphLoadError as exc:
        raise BundleError(str(exc)) from exc

    def read(args: list[Any]) -> dict[str, tuple[str, Shape]]:
        return {
            arg.name: (_ELEMENT_TYPES.get(arg.type, arg.type), tuple(arg.shape)) for arg in args
        }

    return GraphIO(read(session.get_inputs()), read(session.get_outputs()))


def graph_shapes(model_path: str | Path) -> dict[str, Shape]:
    """Input and output shapes of an ONNX graph, read with onnxruntime (no torch, no onnx).

    Dimensions are ints, names of dynamic axes ("batch"), or None.
    """
    return graph_io(model_path).shapes()


def _show(dims: Shape) -> list[int | str]:
    return [d if d is not None else "?" for d in dims]


def _check_shapes(file: str, shapes: Mapping[str, Shape], expected: Mapping[str, Dims]) -> None:
    """BundleError unless each expected tensor is in `shapes` with the expected sizes."""
    for name in expected:
        if name not in shapes:
            raise BundleError(f"{file} has no {name!r}")
    for name, dims in expected.items():
        shape = shapes[name]
        what = "vocabulary size" if name in ("logits", "logprobs") else "shape"
        if len(shape) != len(dims):
            raise BundleError(f"{file} {name} has {len(shape)} dimensions, expected {len(dims)}")
        for got, want in zip(shape, dims, strict=True):
            if want is not None and got != want:
                raise BundleError(
                    f"{what} disagrees: {file} {name} is {list(shape)}, "
                    f"the bundle says {_show(dims)}"
                )


def model_contract(
    vocab_size: int, hidden_size: int, num_layers: int
) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """model.onnx's inputs and outputs."""
    state = TensorSpec("float32", (num_layers, None, hidden_size))
    inputs = {"tokens": TensorSpec("int64", (None, None)), "h0": state, "c0": state}
    outputs = {"logits": TensorSpec("float32", (None, vocab_size)), "hn": state, "cn": state}
    return inputs, outputs


def graph_contract(
    name: str, params: Mapping[str, int], vocab_size: int, hidden_size: int, num_layers: int
) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """The inputs and outputs graph `name` must have, given its params and the model's
    sizes (see the module docstring). KeyError for a graph name it does not know."""
    if name in (SEQUENCE_LOGPROBS, PREFILL):
        inputs, outputs = model_contract(vocab_size, hidden_size, num_layers)
        del outputs["logits"]
        if name == PREFILL:
            return inputs, outputs
        return inputs, {"logprobs": TensorSpec("float32", (None, None, vocab_size)), **outputs}
    width, blocks = params["width"], params["blocks"]
    logits = TensorSpec("float32", (None, vocab_size))
    inv_t = TensorSpec("float32", (None, 1))
    direct = {
        "weights": TensorSpec("float32", (None, blocks * width)),
        "sums": TensorSpec("float32", (None, blocks)),
    }
    if name == STEP_SOFTMAX:
        inputs, outputs = model_contract(vocab_size, hidden_size, num_layers)
        return {**inputs, "inv_t": inv_t}, {**outputs, **direct}
    if name == SAMPLING_DIRECT:
        return {"logits": logits, "inv_t": inv_t}, direct
    if name == DECODE_RUN:
        steps = params["steps"]
        inputs, _ = model_contract(vocab_size, hidden_size, num_layers)
        states = TensorSpec("float32", (steps, num_layers, None, hidden_size))
        return {
            **inputs,
            "inv_t": inv_t,
            "ban": TensorSpec("int64", (None, 1)),
            "uniforms": TensorSpec("float64", (None, steps)),
        }, {"sampled": TensorSpec("int64", (None, steps)), "hs": states, "cs": states}
    if name == SAMPLING_ENVELOPE:
        k = params["exact_blocks"]
        return {"logits": logits, "inv_t": inv_t}, {
            "block_max": TensorSpec("float32", (None, blocks)),
            "bound": TensorSpec("float32", (None, blocks)),
            "exact": TensorSpec("int64", (None, k)),
            "weights": TensorSpec("float32", (None, k, width)),
            "mass": TensorSpec("float32", (None, k)),
        }
    raise KeyError(name)


def check_graph(
    shapes: Mapping[str, Shape],
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    file: str = MODEL,
) -> None:
    """Raise BundleError unless the graph has the bundle's inputs, outputs and sizes."""
    inputs, outputs = model_contract(vocab_size, hidden_size, num_layers)
    _check_shapes(file, shapes, {name: spec.dims for name, spec in {**inputs, **outputs}.items()})


def check_io(
    file: str,
    io: GraphIO,
    inputs: Mapping[str, TensorSpec],
    outputs: Mapping[str, TensorSpec],
) -> None:
    """BundleError unless `io` has exactly these inputs and outputs, types and sizes."""
    for kind, got, want in (("inputs", io.inputs, inputs), ("outputs", io.outputs, outputs)):
        if set(got) != set(want):
            raise BundleError(f"{file} {kind} are {sorted(got)}, expected {sorted(want)}")
        for name, spec in want.items():
            if got[name][0] != spec.dtype:
                raise BundleError(f"{file} {name} is {got[name][0]}, expected {spec.dtype}")
    _check_shapes(
        file, io.shapes(), {name: spec.dims for name, spec in {**inputs, **outputs}.items()}
    )


def _check_file(root: Path, name: str, expected: str) -> Path:
    """The bundle file `name`, present and with the sha256 the manifest records."""
    file = root / name
    if not file.is_file():
        raise BundleError(f"bundle file missing: {file}")
    actual = sha256_file(file)
    if actual != expected:
        raise BundleError(
            f"sha256 mismatch for {file}: manifest {expected[:12]}…, file {actual[:12]}…"
        )
    return file


def _check_params(name: str, params: Any, vocab_size: int) -> dict[str, int]:
    """A graph's params: ints of at least 1, those its kind needs among them, blocks of
    `width` words that cover the vocabulary, and no more exact blocks than blocks."""
    where = f"{MANIFEST} {GRAPHS}.{name}.params"
    needed = GRAPH_PARAMS.get(name, ())
    if not isinstance(params, dict) or not all(
        type(value) is int and value >= 1 for value in params.values()
    ):
        raise BundleError(f"{where} is not a map of positive ints")
    missing = [key for key in needed if key not in params]
    if missing:
        raise BundleError(f"{where} has no {', '.join(missing)}")
    width, blocks = params.get("width"), params.get("blocks")
    if width is not None and blocks is not None and blocks != block_count(vocab_size, width):
        raise BundleError(
            f"{where} disagrees with the vocabulary: {blocks} blocks of {width} words "
            f"for {vocab_size} words"
        )
    if blocks is not None and params.get("exact_blocks", 0) > blocks:
        raise BundleError(f"{where} has more exact blocks than the {blocks} blocks")
    return dict(params)


def _listed_shapes(where: str, listed: Any) -> dict[str, Shape]:
    if not isinstance(listed, dict) or not all(isinstance(v, list) for v in listed.values()):
        raise BundleError(f"{where} is not a map of shapes")
    return {tensor: tuple(shape) for tensor, shape in listed.items()}


def _describe(shapes: Mapping[str, Shape]) -> str:
    return ", ".join(f"{name} {_show(shape)}" for name, shape in sorted(shapes.items()))


def _load_graph(root: Path, name: str, entry: Any, model: Mapping[str, int]) -> GraphInfo:
    """Graph `name` of the manifest's `graphs`, verified: file, sha256, params, and inputs
    and outputs as the manifest lists them and (for a graph this module knows) as its
    params and the model's sizes imply."""
    where = f"{MANIFEST} {GRAPHS}.{name}"
    if not isinstance(entry, dict):
        raise BundleError(f"{where} is not an object")
    file_name, expected = entry.get("file"), entry.get("sha256")
    if not isinstance(file_name, str) or not isinstance(expected, str):
        raise BundleError(f"{where} needs a file and its sha256")
    if Path(file_name).name != file_name or file_name in (MANIFEST, *REQUIRED_FILES):
        raise BundleError(f"{where} names a file that cannot be a graph: {file_name!r}")
    file = _check_file(root, file_name, expected)
    params = _check_params(name, entry.get("params"), model["vocab_size"])
    io = graph_io(file)
    listed = {}
    for kind, got in (("inputs", io.inputs), ("outputs", io.outputs)):
        listed[kind] = _listed_shapes(f"{where}.{kind}", entry.get(kind))
        shapes = {tensor: shape for tensor, (_, shape) in got.items()}
        if shapes != listed[kind]:
            raise BundleError(
                f"{file_name} {kind} ({_describe(shapes)}) disagree with {where}.{kind} "
                f"({_describe(listed[kind])})"
            )
    if name in GRAPH_PARAMS:
        inputs, outputs = graph_contract(
            name, params, model["vocab_size"], model["hidden_size"], model["num_layers"]
        )
        check_io(file_name, io, inputs, outputs)
    return GraphInfo(name, file, expected, listed["inputs"], listed["outputs"], params)


def load_bundle(path: str | Path) -> ModelBundle:
    """Read and verify a bundle: every listed file present with its recorded sha256, a
    graph whose vocabulary, hidden size and layers agree with the manifest and tokenizer,
    and each of the other graphs the manifest lists (file, sha256, params, inputs and
    outputs). A bundle without `graphs` loads with none.
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
        if not isinstance(expected, str):
            raise BundleError(f"{MANIFEST} has no sha256 for {name}")
        if Path(name).name != name or name == MANIFEST:
            raise BundleError(f"{MANIFEST} lists a file outside the bundle: {name!r}")
        _check_file(root, name, expected)
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
    listed = manifest.get(GRAPHS, {})
    if not isinstance(listed, dict):
        raise BundleError(f"{MANIFEST} {GRAPHS} is not an object")
    graphs = {name: _load_graph(root, name, entry, model) for name, entry in listed.items()}
    return ModelBundle(path=root, manifest=manifest, tokenizer=tokenizer, graphs=graphs)


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
    manifest: under `files`, or as the `sha256` of the manifest's `graphs` entry that
    names the file. An existing bundle at `out` is replaced; any other existing,
    non-empty folder is refused and left as it was.
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
        graphs = {name: dict(entry) for name, entry in dict(manifest.get(GRAPHS) or {}).items()}
        graph_of = {entry.get("file"): name for name, entry in graphs.items()}
        hashes: dict[str, str] = {}
        for name, source in files.items():
            dest = staging / name
            if isinstance(source, bytes):
                dest.write_bytes(source)
            else:
                shutil.copyfile(source, dest)
            if name in graph_of:
                graphs[graph_of[name]]["sha256"] = sha256_file(dest)
            else:
                hashes[name] = sha256_file(dest)
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": hashes}
        if graphs:
            full[GRAPHS] = graphs
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
