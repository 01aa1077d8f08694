"""load_bundle verifies each graph the manifest lists, and still loads a bundle without them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from export.graphs import block_params, direct_graph
from simmer.bundle import (
    DECODE_RUN,
    GRAPHS,
    MANIFEST,
    MODEL,
    PREFILL,
    SAMPLING_DIRECT,
    SAMPLING_ENVELOPE,
    SEQUENCE_LOGPROBS,
    STEP_SOFTMAX,
    TOKENIZER,
    BundleError,
    graph_io,
    load_bundle,
    sha256_file,
    write_bundle,
)
from tests.simmer.test_bundle import refusal

ALL = (STEP_SOFTMAX, SAMPLING_DIRECT, SAMPLING_ENVELOPE, DECODE_RUN, PREFILL, SEQUENCE_LOGPROBS)


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def edit_manifest(bundle: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    edit(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def vocab_of(bundle: Path) -> int:
    return int(json.loads((bundle / MANIFEST).read_text())["model"]["vocab_size"])


def test_every_listed_graph_is_exposed_with_its_path_and_params(bundle: Path) -> None:
    loaded = load_bundle(bundle)
    p = block_params(loaded.vocab_size)
    assert set(loaded.graphs) == set(ALL)
    envelope = loaded.graph(SAMPLING_ENVELOPE)
    assert envelope is not None
    assert envelope.path == bundle / "sampling_envelope.onnx"
    assert dict(envelope.params) == p
    assert (envelope.width, envelope.blocks) == (p["width"], p["blocks"])
    step = loaded.graph(STEP_SOFTMAX)
    assert step is not None
    assert step.sha256 == sha256_file(bundle / "step_softmax.onnx")
    assert step.inputs["inv_t"] == ("batch", 1)
    assert step.outputs["sums"] == ("batch", p["blocks"])
    scoring = loaded.graph(SEQUENCE_LOGPROBS)
    assert scoring is not None
    assert scoring.path == bundle / "sequence_logprobs.onnx"
    assert dict(scoring.params) == {}
    assert scoring.outputs["logprobs"] == ("batch", "seq", loaded.vocab_size)
    run = loaded.graph(DECODE_RUN)
    assert run is not None
    steps = run.params["steps"]
    assert dict(run.params) == {"width": p["width"], "blocks": p["blocks"], "steps": steps}
    assert steps >= 2
    assert run.inputs["uniforms"] == ("batch", steps)
    assert run.inputs["ban"] == ("batch", 1)
    assert run.outputs["sampled"] == ("batch", steps)
    assert run.outputs["hs"] == (steps, loaded.num_layers, "batch", loaded.hidden_size)


def test_the_prefill_graph_is_listed_with_the_models_inputs_and_its_state_alone(
    bundle: Path,
) -> None:
    loaded = load_bundle(bundle)
    prefill = loaded.graph(PREFILL)
    assert prefill is not None
    assert prefill.path == bundle / "prefill.onnx"
    assert dict(prefill.params) == {}
    assert set(prefill.inputs) == {"tokens", "h0", "c0"}
    assert set(prefill.outputs) == {"hn", "cn"}


def test_a_bundle_from_before_prefill_loads_without_it(bundle: Path) -> None:
    (bundle / "prefill.onnx").unlink()
    edit_manifest(bundle, lambda m: m[GRAPHS].pop(PREFILL))
    assert set(load_bundle(bundle).graphs) == set(ALL) - {PREFILL}


def ship_model_as(bundle: Path, name: str) -> None:
    """model.onnx shipped as graph `name`, its hash and shapes relisted in the manifest:
    only the graph's contract can tell."""
    file = bundle / f"{name}.onnx"
    file.write_bytes((bundle / MODEL).read_bytes())

    def edit(manifest: dict[str, Any]) -> None:
        entry = manifest[GRAPHS][name]
        entry["sha256"] = sha256_file(file)
        entry["outputs"] = {t: list(shape) for t, (_, shape) in graph_io(file).outputs.items()}

    edit_manifest(bundle, edit)


def test_model_onnx_shipped_as_the_prefill_graph_is_refused(bundle: Path) -> None:
    ship_model_as(bundle, PREFILL)
    assert refusal(bundle) == (
        "prefill.onnx outputs are ['cn', 'hn', 'logits'], expected ['cn', 'hn']"
    )


def test_a_bundle_from_before_decode_run_loads_without_it(bundle: Path) -> None:
    (bundle / "decode_run.onnx").unlink()
    edit_manifest(bundle, lambda m: m[GRAPHS].pop(DECODE_RUN))
    assert set(load_bundle(bundle).graphs) == set(ALL) - {DECODE_RUN}


def test_a_decode_run_whose_steps_disagree_with_its_graph_is_refused(bundle: Path) -> None:
    """The manifest's shapes relisted for one step more than the graph has: the file's
    own shapes no longer match, and a run would read past its numbers."""

    def edit(manifest: dict[str, Any]) -> None:
        entry = manifest[GRAPHS][DECODE_RUN]
        entry["params"]["steps"] += 1

    edit_manifest(bundle, edit)
    assert refusal(bundle).startswith("shape disagrees: decode_run.onnx ")


def test_a_decode_run_without_steps_is_refused(bundle: Path) -> None:
    edit_manifest(bundle, lambda m: m[GRAPHS][DECODE_RUN]["params"].pop("steps"))
    assert refusal(bundle).endswith("graphs.decode_run.params has no steps")


def test_a_bundle_from_before_the_scoring_graph_loads_without_it(bundle: Path) -> None:
    (bundle / "sequence_logprobs.onnx").unlink()
    edit_manifest(bundle, lambda m: m[GRAPHS].pop(SEQUENCE_LOGPROBS))
    loaded = load_bundle(bundle)
    assert loaded.graph(SEQUENCE_LOGPROBS) is None
    assert set(loaded.graphs) == set(ALL) - {SEQUENCE_LOGPROBS}


def test_a_scoring_graph_with_logits_at_the_last_position_only_is_refused(bundle: Path) -> None:
    ship_model_as(bundle, SEQUENCE_LOGPROBS)
    assert refusal(bundle) == (
        "sequence_logprobs.onnx outputs are ['cn', 'hn', 'logits'], "
        "expected ['cn', 'hn', 'logprobs']"
    )


def test_a_bundle_without_graphs_still_loads_with_none(bundle: Path) -> None:
    for name in ALL:
        (bundle / f"{name}.onnx").unlink()
    edit_manifest(bundle, lambda manifest: manifest.pop(GRAPHS))
    loaded = load_bundle(bundle)
    assert loaded.graphs == {}
    assert all(loaded.graph(name) is None for name in ALL)
    assert loaded.vocab_size == vocab_of(bundle)


@pytest.mark.parametrize("name", ALL)
def test_a_tampered_graph_is_refused(bundle: Path, name: str) -> None:
    file = bundle / f"{name}.onnx"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    assert refusal(bundle).startswith(f"sha256 mismatch for {file}: manifest ")


@pytest.mark.parametrize("name", ALL)
def test_a_missing_graph_is_refused(bundle: Path, name: str) -> None:
    (bundle / f"{name}.onnx").unlink()
    assert refusal(bundle) == f"bundle file missing: {bundle / f'{name}.onnx'}"


def replace_direct_graph(bundle: Path, width: int, relist: bool) -> None:
    """sampling_direct.onnx rebuilt with blocks of `width` words, its hash updated; with
    `relist`, the manifest's shapes too (a consistent lie that only the contract catches)."""
    vocab = vocab_of(bundle)
    file = bundle / "sampling_direct.onnx"
    file.write_bytes(direct_graph(vocab, width, 17).SerializeToString())
    blocks = -(-vocab // width)

    def edit(manifest: dict[str, Any]) -> None:
        entry = manifest[GRAPHS][SAMPLING_DIRECT]
        entry["sha256"] = sha256_file(file)
        if relist:
            entry["outputs"] = {"weights": ["batch", blocks * width], "sums": ["batch", blocks]}

    edit_manifest(bundle, edit)


def test_a_graph_whose_outputs_differ_from_the_manifest_is_refused_despite_its_hash(
    bundle: Path,
) -> None:
    width = block_params(vocab_of(bundle))["width"]
    replace_direct_graph(bundle, width + 1, relist=False)
    message = refusal(bundle)
    assert message.startswith("sampling_direct.onnx outputs (")
    assert "disagree with manifest.json graphs.sampling_direct.outputs" in message


def test_a_graph_whose_shapes_disagree_with_its_params_is_refused(bundle: Path) -> None:
    """The file and the manifest's shapes agree, but not with the manifest's own width."""
    p = block_params(vocab_of(bundle))
    replace_direct_graph(bundle, p["width"] + 1, relist=True)
    blocks = p["blocks"] * p["width"]
    assert refusal(bundle).startswith("shape disagrees: sampling_direct.onnx weights is ")
    assert refusal(bundle).endswith(f"the bundle says ['?', {blocks}]")


def test_params_that_do_not_cover_the_vocabulary_are_refused(bundle: Path) -> None:
    edit_manifest(bundle, lambda m: m[GRAPHS][SAMPLING_ENVELOPE]["params"].update(blocks=1))
    assert "graphs.sampling_envelope.params disagrees with the vocabulary" in refusal(bundle)


def test_missing_params_are_refused(bundle: Path) -> None:
    edit_manifest(bundle, lambda m: m[GRAPHS][SAMPLING_ENVELOPE]["params"].pop("exact_blocks"))
    assert refusal(bundle).endswith("graphs.sampling_envelope.params has no exact_blocks")


@pytest.mark.parametrize("file", ["../step_softmax.onnx", MODEL, MANIFEST])
def test_a_graph_file_outside_the_bundle_or_shared_with_the_model_is_refused(
    bundle: Path, file: str
) -> None:
    edit_manifest(bundle, lambda m: m[GRAPHS][STEP_SOFTMAX].update(file=file))
    assert "graphs.step_softmax names a file that cannot be a graph" in refusal(bundle)


def test_a_graphs_section_that_is_not_an_object_is_refused(bundle: Path) -> None:
    edit_manifest(bundle, lambda m: m.update(graphs=["step_softmax.onnx"]))
    assert refusal(bundle) == "manifest.json graphs is not an object"


def test_write_bundle_records_graph_hashes_in_their_entries(bundle: Path, tmp_path: Path) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    for key in ("format", "format_version", "files"):
        del manifest[key]
    for entry in manifest[GRAPHS].values():
        del entry["sha256"]
    files: dict[str, Path | bytes] = {MODEL: bundle / MODEL, TOKENIZER: bundle / TOKENIZER}
    files.update({f"{name}.onnx": bundle / f"{name}.onnx" for name in ALL})
    out = write_bundle(tmp_path / "rewritten", files, manifest)
    written = json.loads((out / MANIFEST).read_text())
    assert set(written["files"]) == {MODEL, TOKENIZER}
    for name in ALL:
        assert written[GRAPHS][name]["sha256"] == sha256_file(out / f"{name}.onnx")
    assert set(load_bundle(out).graphs) == set(ALL)


def test_write_bundle_never_publishes_a_bad_graph(bundle: Path, tmp_path: Path) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    del manifest["files"]
    vocab = manifest["model"]["vocab_size"]
    wrong = direct_graph(vocab, block_params(vocab)["width"] + 1, 17).SerializeToString()
    files: dict[str, Path | bytes] = {MODEL: bundle / MODEL, TOKENIZER: bundle / TOKENIZER}
    files.update({f"{name}.onnx": bundle / f"{name}.onnx" for name in ALL})
    files["sampling_direct.onnx"] = wrong
    out = tmp_path / "never"
    with pytest.raises(BundleError, match=r"sampling_direct\.onnx outputs"):
        write_bundle(out, files, manifest)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
