"""The stop-aware loss: the first pad after a recipe is a target, later pads are not."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from training.model import LSTMConfig, RecipeLSTM
from training.presets import get_preset
from training.train import counted_targets, losses, lr_at, selected_losses, stop_aware_mask

# One window of a 3-word recipe followed by padding, and one that fills the window.
WINDOWS = torch.tensor([[5, 6, 7, 0, 0, 0], [4, 5, 6, 7, 8, 9]])
X, Y = WINDOWS[:, :-1], WINDOWS[:, 1:]


def test_first_pad_is_a_target_and_later_pads_are_not() -> None:
    mask = stop_aware_mask(X)
    # targets of the short recipe: 6, 7, stop, pad, pad
    assert mask[0].tolist() == [True, True, True, False, False]
    assert mask[1].all()


def test_masked_loss_counts_the_stop_target_and_ignores_later_pads() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 10, requires_grad=True)
    base = losses(logits, X, Y)
    assert int(base["stop_n"]) == 8  # 3 targets (one of them the stop) + 5
    assert int(base["pads_n"]) == 7  # word targets only
    assert int(base["none_n"]) == 10  # every position, as Keras

    later_pads = logits.detach().clone()
    later_pads[0, 3:] += torch.randn(2, 10) * 5
    moved = losses(later_pads, X, Y)
    assert torch.equal(moved["stop_sum"], base["stop_sum"])
    assert torch.equal(moved["pads_sum"], base["pads_sum"])
    assert not torch.equal(moved["none_sum"], base["none_sum"])

    stop_target = logits.detach().clone()
    stop_target[0, 2, 0] += 5.0  # more confident that the recipe stops
    stopped = losses(stop_target, X, Y)
    assert stopped["stop_sum"] < base["stop_sum"]
    assert torch.equal(stopped["pads_sum"], base["pads_sum"])


def test_masked_loss_gradient_never_reaches_later_pad_positions() -> None:
    logits = torch.randn(2, 5, 10, requires_grad=True)
    torch.autograd.backward(losses(logits, X, Y)["stop_sum"])
    assert logits.grad is not None
    assert not logits.grad[0, 3:].any()
    assert logits.grad[0, 2].abs().sum() > 0


def test_uniform_logits_give_log_vocab_loss() -> None:
    parts = losses(torch.zeros(2, 5, 10), X, Y)
    assert float(parts["stop_sum"] / parts["stop_n"]) == pytest.approx(math.log(10))


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    config = get_preset("tiny").with_overrides(lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    rates = [lr_at(step, 110, config) for step in range(110)]
    assert rates[0] == pytest.approx(1e-3)
    assert rates[9] == pytest.approx(1e-2)
    assert all(a >= b - 1e-15 for a, b in itertools.pairwise(rates[9:]))
    assert lr_at(110, 110, config) == pytest.approx(1e-3)
    constant = get_preset("tiny")
    assert {lr_at(s, 50, constant) for s in range(50)} == {constant.lr}


def test_selected_losses_match_the_full_losses_over_the_counted_targets() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 10)
    full = losses(logits, X, Y)
    for mask in ("stop", "pads"):
        counted = counted_targets(X, Y, torch.zeros(2, dtype=torch.long), mask)
        assert torch.equal(counted, stop_aware_mask(X) if mask == "stop" else Y != 0)
        parts, objective = selected_losses(logits[counted], Y[counted])
        assert torch.allclose(parts[f"{mask}_sum"], full[f"{mask}_sum"])
        assert int(parts[f"{mask}_n"]) == int(full[f"{mask}_n"])
        assert torch.allclose(objective, full[f"{mask}_sum"])
    assert int(parts["none_n"]) == 0  # not every position was computed


def test_count_from_hides_a_rows_context_targets() -> None:
    counted = counted_targets(X, Y, torch.tensor([0, 3]), "stop")
    assert counted[0].tolist() == [True, True, True, False, False]
    assert counted[1].tolist() == [False, False, False, True, True]


def test_stop_weight_scales_only_the_stop_targets_in_the_objective() -> None:
    torch.manual_seed(2)
    counted = stop_aware_mask(X)
    logits, targets = torch.randn(int(counted.sum()), 10), Y[counted]
    parts, plain = selected_losses(logits, targets, 1.0)
    _, heavy = selected_losses(logits, targets, 3.0)
    stop_ce = parts["stop_sum"] - parts["pads_sum"]  # the one stop target in X, Y
    assert torch.allclose(heavy - plain, 2.0 * stop_ce)


def test_the_model_computes_logits_only_at_the_asked_positions() -> None:
    torch.manual_seed(3)
    model = RecipeLSTM(LSTMConfig(vocab_size=10, embedding_dim=4, hidden_size=6)).eval()
    counted = stop_aware_mask(X)
    full, state = model(X)
    some, same_state = model(X, positions=counted)
    assert some.shape == (int(counted.sum()), 10)
    assert torch.allclose(some, full[counted])
    assert torch.equal(state[0], same_state[0])
