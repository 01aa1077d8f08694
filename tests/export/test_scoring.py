"""export.scoring: the scoring graph gives torch's log_softmax at every position, what
model.onnx gives stepped one token at a time, the same in chunks; its check fails on a
graph that does not; every bundle ships it, int8 ones rewritten like their model."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.graphs import BuiltGraph
from export.onnx_export import ExportError, export_onnx, export_step
from export.parity import PARITY_TOL, STEP_TOL, Reference, random_state
from export.runtime import open_session
from export.scoring import SCORING_AXES, SequenceLogprobs, build_scoring, check_scoring
from export.validation import TextSample
from simmer.bundle import GRAPHS, SEQUENCE_LOGPROBS, graph_io, load_bundle, sha256_file
from training.model import RecipeLSTM


class ForgetsState(SequenceLogprobs):
    """A scoring graph that hands back the state it was given instead of the new one."""

    def forward(
        self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logprobs, _, _ = super().forward(tokens, h0, c0)
        return logprobs, h0 * 1.0, c0 * 1.0


def export_scoring(module: SequenceLogprobs, path: Path) -> BuiltGraph:
    export_step(module, module.model.config, path, 17, SCORING_AXES)
    return BuiltGraph(SEQUENCE_LOGPROBS, path.read_bytes(), {})


def test_every_scoring_check_passes_on_the_tiny_model(
    tiny_model: RecipeLSTM, tiny_onnx: Path, tiny_sample: TextSample, tmp_path: Path
) -> None:
    graph = build_scoring(tiny_model, tmp_path, 17)
    checks = check_scoring(
        graph, Reference(tiny_model, tiny_model.config), tiny_onnx, tiny_sample.token_lists()
    )
    assert len(checks["cases"]) >= 4
    assert checks["max_abs_torch_logprobs"] <= PARITY_TOL
    assert checks["max_abs_torch_state"] <= PARITY_TOL
    assert checks["max_abs_steps_logprobs"] <= STEP_TOL
    assert checks["max_abs_steps_state"] <= STEP_TOL
    assert checks["max_abs_chunked"] <= STEP_TOL


def test_the_scoring_graph_is_torchs_log_softmax_at_every_position(
    tiny_model: RecipeLSTM, tmp_path: Path
) -> None:
    config = tiny_model.config
    graph = build_scoring(tiny_model, tmp_path, 17)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (3, 11), dtype=np.int64)
    h, c = random_state(config, 3, rng)
    logprobs, hn, cn = open_session(graph.model).run(None, {"tokens": tokens, "h0": h, "c0": c})
    with torch.no_grad():
        logits, (want_h, want_c) = tiny_model(
            torch.from_numpy(tokens), (torch.from_numpy(h), torch.from_numpy(c))
        )
        want = torch.log_softmax(logits, dim=-1).numpy()
    assert logprobs.shape == (3, 11, config.vocab_size)
    np.testing.assert_allclose(logprobs, want, rtol=0, atol=PARITY_TOL)
    np.testing.assert_allclose(hn, want_h.numpy(), rtol=0, atol=PARITY_TOL)
    np.testing.assert_allclose(cn, want_c.numpy(), rtol=0, atol=PARITY_TOL)


def test_every_scoring_check_passes_on_a_two_layer_model(
    tiny_model: RecipeLSTM, tiny_sample: TextSample, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    stacked = RecipeLSTM(replace(tiny_model.config, num_layers=2)).eval()
    export_onnx(stacked, tmp_path / "stacked.onnx")
    graph = build_scoring(stacked, tmp_path, 17)
    checks = check_scoring(
        graph,
        Reference(stacked, stacked.config),
        tmp_path / "stacked.onnx",
        tiny_sample.token_lists(),
    )
    assert checks["max_abs_steps_logprobs"] <= STEP_TOL


def test_scoring_parity_fails_when_the_graph_has_other_weights(
    tiny_model: RecipeLSTM,
    tiny_onnx: Path,
    perturbed: Callable[[float], RecipeLSTM],
    tiny_sample: TextSample,
    tmp_path: Path,
) -> None:
    graph = build_scoring(perturbed(1e-3), tmp_path, 17)
    with pytest.raises(ExportError, match="logprobs differ from torch's log_softmax") as caught:
        check_scoring(
            graph, Reference(tiny_model, tiny_model.config), tiny_onnx, tiny_sample.token_lists()
        )
    assert str(caught.value).startswith("sequence_logprobs parity failed on random input")
    assert "\n" not in str(caught.value)


def test_scoring_check_fails_when_the_state_is_not_carried(
    tiny_model: RecipeLSTM, tiny_onnx: Path, tiny_sample: TextSample, tmp_path: Path
) -> None:
    graph = export_scoring(ForgetsState(tiny_model), tmp_path / "forgets.onnx")
    with pytest.raises(ExportError, match="the state differs from torch's"):
        check_scoring(
            graph, Reference(tiny_model, tiny_model.config), tiny_onnx, tiny_sample.token_lists()
        )


def test_scoring_check_refuses_a_graph_without_logprobs_at_every_position(
    tiny_model: RecipeLSTM, tiny_onnx: Path, tiny_sample: TextSample
) -> None:
    graph = BuiltGraph(SEQUENCE_LOGPROBS, tiny_onnx.read_bytes(), {})  # last position only
    with pytest.raises(
        ExportError, match=r"sequence_logprobs\.onnx outputs are \['cn', 'hn', 'logits'\]"
    ):
        check_scoring(
            graph, Reference(tiny_model, tiny_model.config), tiny_onnx, tiny_sample.token_lists()
        )


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_the_bundle_ships_the_scoring_graph_listed_with_its_shapes_and_checks(
    kind: str, tiny_bundle: Path, int8_bundle: Path, tiny_model: RecipeLSTM
) -> None:
    bundle = tiny_bundle if kind == "fp32" else int8_bundle
    config = tiny_model.config
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest[GRAPHS][SEQUENCE_LOGPROBS]
    file = bundle / "sequence_logprobs.onnx"
    assert entry["file"] == file.name
    assert entry["sha256"] == sha256_file(file)
    assert entry["params"] == {}
    assert entry["inputs"] == {
        "tokens": ["batch", "seq"],
        "h0": [config.num_layers, "batch", config.hidden_size],
        "c0": [config.num_layers, "batch", config.hidden_size],
    }
    assert entry["outputs"]["logprobs"] == ["batch", "seq", config.vocab_size]
    io = graph_io(file)
    assert entry["outputs"] == {t: list(shape) for t, (_, shape) in io.outputs.items()}
    onnx.checker.check_model(str(file), full_check=True)
    ops = {node.op_type for node in onnx.load(str(file)).graph.node}
    assert ("MatMulInteger" in ops) == (kind == "int8")  # rewritten as model.onnx is
    checks = manifest["parity"][SEQUENCE_LOGPROBS]
    assert checks["max_abs_steps_logprobs"] <= checks["steps_tolerance"]
    assert checks["max_abs_torch_logprobs"] <= checks["torch_tolerance"]
    info = load_bundle(bundle).graph(SEQUENCE_LOGPROBS)
    assert info is not None and info.path == file


def test_the_int8_bundles_scoring_graph_scores_what_its_model_serves(
    int8_bundle: Path, tiny_model: RecipeLSTM
) -> None:
    config = tiny_model.config
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, config.vocab_size, (2, 9), dtype=np.int64)
    h, c = random_state(config, 2, rng)
    logprobs = open_session(int8_bundle / "sequence_logprobs.onnx").run(
        ["logprobs"], {"tokens": tokens, "h0": h, "c0": c}
    )[0]
    model = open_session(int8_bundle / "model.onnx")
    for t in range(tokens.shape[1]):
        logits, h, c = model.run(None, {"tokens": tokens[:, t : t + 1], "h0": h, "c0": c})
        want = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
        np.testing.assert_allclose(logprobs[:, t], want, rtol=0, atol=STEP_TOL)
