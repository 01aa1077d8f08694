"""The checks run before a bundle is written: each passes on a good graph, fails on a broken one."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch
from onnx import shape_inference
from torch import nn

from export.onnx_export import ExportError, check_onnx, export_onnx, export_step
from export.parity import (
    PARITY_TOL,
    STEP_TOL,
    Reference,
    check_batch_independence,
    check_greedy,
    check_incremental,
    check_parity,
    run_checks,
)
from export.runtime import open_session
from export.validation import TextSample, prompts_from
from training.model import LastStepLSTM, RecipeLSTM


class DropsState(nn.Module):
    """A step graph that hands back the state it was given instead of the new one."""

    def __init__(self, model: RecipeLSTM) -> None:
        super().__init__()
        self.step = LastStepLSTM(model)

    def forward(
        self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, _, _ = self.step(tokens, h0, c0)
        return logits, h0 * 1.0, c0 * 1.0


class MixesRows(nn.Module):
    """A step graph whose rows see a little of the batch's mean state."""

    def __init__(self, model: RecipeLSTM) -> None:
        super().__init__()
        self.step = LastStepLSTM(model)

    def forward(
        self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mixed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = self.step(
            tokens, h0 + 0.01 * h0.mean(dim=1, keepdim=True), c0
        )
        return mixed


def test_every_check_passes_on_the_exported_tiny_model(
    tiny_model: RecipeLSTM, tiny_onnx: Path, tiny_sample: TextSample
) -> None:
    checks = run_checks(
        Reference(tiny_model, tiny_model.config),
        open_session(tiny_onnx),
        tiny_sample.token_lists(),
        prompts_from(tiny_sample),
    )
    parity = checks["torch_vs_onnxruntime"]
    assert len(parity["cases"]) >= 6
    for key in ("max_abs_logits_random", "max_abs_state_random", "max_abs_logits_text"):
        assert parity[key] <= PARITY_TOL
    assert checks["incremental"]["max_abs"] <= STEP_TOL
    assert checks["batch_independence"]["max_abs"] <= STEP_TOL
    assert checks["greedy"] == {"prompts": 3, "tokens": 50, "identical": True}


def test_every_check_passes_on_a_two_layer_model(
    tiny_model: RecipeLSTM, tiny_sample: TextSample, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    stacked = RecipeLSTM(replace(tiny_model.config, num_layers=2)).eval()
    export_onnx(stacked, tmp_path / "stacked.onnx")
    checks = run_checks(
        Reference(stacked, stacked.config),
        open_session(tmp_path / "stacked.onnx"),
        tiny_sample.token_lists(),
        prompts_from(tiny_sample),
    )
    assert checks["torch_vs_onnxruntime"]["max_abs_state_random"] <= PARITY_TOL
    assert checks["greedy"]["identical"] is True


def test_parity_fails_when_the_graph_has_other_weights(
    tiny_model: RecipeLSTM,
    perturbed: Callable[[float], RecipeLSTM],
    tiny_sample: TextSample,
    tmp_path: Path,
) -> None:
    export_onnx(perturbed(1e-3), tmp_path / "other.onnx")
    with pytest.raises(ExportError, match="parity failed"):
        check_parity(
            Reference(tiny_model, tiny_model.config),
            open_session(tmp_path / "other.onnx"),
            tiny_sample.token_lists(),
        )


def test_incremental_check_fails_when_the_state_is_not_carried(
    tiny_model: RecipeLSTM, tiny_sample: TextSample, tmp_path: Path
) -> None:
    export_step(DropsState(tiny_model), tiny_model.config, tmp_path / "stateless.onnx", 17)
    with pytest.raises(ExportError, match="incremental check failed"):
        check_incremental(
            open_session(tmp_path / "stateless.onnx"), tiny_model.config, tiny_sample.token_lists()
        )


def test_batch_independence_fails_when_rows_see_each_other(
    tiny_model: RecipeLSTM, tmp_path: Path
) -> None:
    export_step(MixesRows(tiny_model), tiny_model.config, tmp_path / "mixing.onnx", 17)
    with pytest.raises(ExportError, match="batch independence failed"):
        check_batch_independence(open_session(tmp_path / "mixing.onnx"), tiny_model.config)


def test_greedy_check_fails_when_the_graph_prefers_another_word(
    tiny_model: RecipeLSTM, tiny_sample: TextSample, tmp_path: Path
) -> None:
    prompts = prompts_from(tiny_sample)
    with torch.no_grad():
        logits, _ = tiny_model(torch.tensor([prompts[0]]))
    first = int(torch.argmax(logits[0, -1]))
    biased = copy.deepcopy(tiny_model)
    with torch.no_grad():
        biased.head.bias[(first + 1) % biased.config.vocab_size] += 100.0
    export_onnx(biased, tmp_path / "biased.onnx")
    with pytest.raises(ExportError, match="greedy decode differs for prompt 0 at token 0"):
        check_greedy(
            Reference(tiny_model, tiny_model.config),
            open_session(tmp_path / "biased.onnx"),
            prompts,
        )


def test_checker_rejects_a_graph_that_reads_an_undefined_value(
    tiny_onnx: Path, tmp_path: Path
) -> None:
    model = onnx.load(str(tiny_onnx))
    model.graph.node[-1].input[0] = "nowhere"
    onnx.save(model, str(tmp_path / "broken.onnx"))
    with pytest.raises(ExportError, match=r"onnx\.checker failed"):
        check_onnx(tmp_path / "broken.onnx")


class AllPositions(nn.Module):
    """The same function computed the wasteful way: logits everywhere, then the last row."""

    def __init__(self, model: RecipeLSTM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, (hn, cn) = self.model(tokens, (h0, c0))  # (B, T, V)
        return logits[:, -1], hn, cn


def tensors_with_a_vocab_axis(path: Path, vocab: int) -> dict[str, list[int | str]]:
    inferred = shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {
        value.name: [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]
        for value in [*inferred.graph.value_info, *inferred.graph.output]
    }
    return {name: dims for name, dims in shapes.items() if vocab in dims}


def test_graph_never_holds_logits_for_every_position(
    tiny_model: RecipeLSTM, tiny_onnx: Path, tmp_path: Path
) -> None:
    vocab = tiny_model.config.vocab_size
    assert tensors_with_a_vocab_axis(tiny_onnx, vocab) == {"logits": ["batch", vocab]}
    export_step(AllPositions(tiny_model), tiny_model.config, tmp_path / "wasteful.onnx", 17)
    wasteful = tensors_with_a_vocab_axis(tmp_path / "wasteful.onnx", vocab)
    assert any(len(dims) == 3 for dims in wasteful.values())  # the helper sees (B, T, V)
