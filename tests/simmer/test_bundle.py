"""simmer.bundle: load_bundle refuses a bundle it cannot trust, with one line, and loads
nothing of it; write_bundle never publishes one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from simmer.bundle import (
    MANIFEST,
    MODEL,
    TOKENIZER,
    BundleError,
    graph_shapes,
    load_bundle,
    write_bundle,
)
from simmer.tokenizer import Tokenizer


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def refusal(path: Path) -> str:
    with pytest.raises(BundleError) as caught:
        load_bundle(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_an_untouched_bundle_loads_with_the_graphs_sizes(bundle: Path) -> None:
    loaded = load_bundle(bundle)
    shapes = graph_shapes(bundle / MODEL)
    assert shapes["logits"] == ("batch", loaded.vocab_size)
    assert shapes["h0"] == (loaded.num_layers, "batch", loaded.hidden_size)
    assert loaded.tokenizer.vocab_size == loaded.vocab_size
    assert loaded.precision == "fp32"


def test_a_tampered_model_is_refused(bundle: Path) -> None:
    with open(bundle / MODEL, "ab") as handle:
        handle.write(b"\0")
    assert refusal(bundle).startswith(f"sha256 mismatch for {bundle / MODEL}")


@pytest.mark.parametrize("name", [MODEL, TOKENIZER])
def test_a_missing_file_is_refused(bundle: Path, name: str) -> None:
    (bundle / name).unlink()
    assert refusal(bundle) == f"bundle file missing: {bundle / name}"


def test_a_manifest_that_disagrees_with_its_tokenizer_is_refused(bundle: Path) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["model"]["vocab_size"] += 1
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    assert refusal(bundle).startswith("vocabulary size disagrees: manifest")


def test_a_graph_whose_vocabulary_disagrees_is_refused_even_with_matching_hashes(
    bundle: Path, tmp_path: Path
) -> None:
    """Tokenizer and manifest say one word more than the graph's logits: hashes cannot catch it."""
    tokenizer = Tokenizer.load(bundle / TOKENIZER)
    bigger = Tokenizer([*tokenizer.vocab, "zzz-not-a-word"])
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["model"]["vocab_size"] = bigger.vocab_size
    del manifest["files"]
    files: dict[str, Path | bytes] = {
        MODEL: bundle / MODEL,
        TOKENIZER: json.dumps(bigger.to_dict()).encode(),
    }
    staged = tmp_path / "staged"
    # write_bundle loads what it wrote before publishing, so the bad bundle never appears
    with pytest.raises(BundleError, match=r"vocabulary size disagrees: model\.onnx logits"):
        write_bundle(staged, files, manifest)
    assert not staged.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_a_file_listed_outside_the_bundle_is_refused(bundle: Path) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["../elsewhere"] = manifest["files"][MODEL]
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    assert "outside the bundle" in refusal(bundle)
