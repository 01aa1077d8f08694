"""The model: the book's size, shapes, and the serving graph's agreement with it."""

from __future__ import annotations

import pytest
import torch

from training.model import LastStepLSTM, LSTMConfig, RecipeLSTM
from training.presets import get_preset


def test_book_configuration_has_the_documented_parameter_count() -> None:
    book = get_preset("book")
    config = LSTMConfig(
        vocab_size=book.vocab_size,
        embedding_dim=book.embedding_dim,
        hidden_size=book.hidden_size,
        num_layers=book.num_layers,
    )
    assert RecipeLSTM(config).num_parameters() == 2_407_760


def test_stacked_variant_adds_one_lstm_layer() -> None:
    one = RecipeLSTM(LSTMConfig(vocab_size=50, embedding_dim=8, hidden_size=16))
    two = RecipeLSTM(LSTMConfig(vocab_size=50, embedding_dim=8, hidden_size=16, num_layers=2))
    # a second layer: 4 gates x 16 units x (16 inputs + 16 recurrent + 2 biases)
    assert two.num_parameters() - one.num_parameters() == 4 * 16 * (16 + 16 + 2)


def test_forward_shapes_and_state_carry_over() -> None:
    torch.manual_seed(0)
    model = RecipeLSTM(LSTMConfig(vocab_size=50, embedding_dim=8, hidden_size=16, num_layers=2))
    tokens = torch.randint(1, 50, (3, 7))
    logits, (h, c) = model(tokens)
    assert logits.shape == (3, 7, 50)
    assert h.shape == c.shape == (2, 3, 16)
    first, state = model(tokens[:, :4])
    rest, _ = model(tokens[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), logits)


def test_last_step_graph_matches_the_full_forward() -> None:
    torch.manual_seed(0)
    model = RecipeLSTM(LSTMConfig(vocab_size=50, embedding_dim=8, hidden_size=16)).eval()
    tokens = torch.randint(1, 50, (2, 5))
    h0 = torch.randn(1, 2, 16)
    c0 = torch.randn(1, 2, 16)
    logits, (h, c) = model(tokens, (h0, c0))
    last, hn, cn = LastStepLSTM(model)(tokens, h0, c0)
    torch.testing.assert_close(last, logits[:, -1])
    torch.testing.assert_close((hn, cn), (h, c))


def test_padding_embedding_stays_zero_after_a_step() -> None:
    model = RecipeLSTM(LSTMConfig(vocab_size=20, embedding_dim=4, hidden_size=8))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    logits, _ = model(torch.tensor([[3, 0, 0, 5]]))
    torch.autograd.backward(logits.sum())
    optimizer.step()
    assert not model.embedding.weight[0].any()


def test_embedding_dropout_acts_in_training_only() -> None:
    torch.manual_seed(0)
    config = LSTMConfig(vocab_size=50, embedding_dim=8, hidden_size=16, embed_dropout=0.5)
    model = RecipeLSTM(config)
    plain = RecipeLSTM(LSTMConfig(vocab_size=50, embedding_dim=8, hidden_size=16))
    plain.load_state_dict(model.state_dict())  # dropout has no weights: same parameters
    tokens = torch.randint(2, 50, (3, 7))
    model.eval()
    plain.eval()
    assert torch.equal(model(tokens)[0], plain(tokens)[0])  # the served model is the same
    model.train()
    assert not torch.allclose(model(tokens)[0], plain(tokens)[0])


def test_weight_decay_reaches_the_matrices_and_never_the_biases() -> None:
    from training.train import make_optimizer

    model = RecipeLSTM(LSTMConfig(vocab_size=50, embedding_dim=8, hidden_size=16))
    config = get_preset("tiny").with_overrides(weight_decay=0.1)
    decayed, kept = make_optimizer(model, config).param_groups
    assert decayed["weight_decay"] == 0.1 and kept["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {
        id(model.embedding.weight),
        id(model.head.weight),
        *(id(p) for name, p in model.lstm.named_parameters() if name.startswith("weight")),
    }
    assert all(p.dim() == 1 for p in kept["params"])
    assert len(decayed["params"]) + len(kept["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"embed_dropout": 1.0}, "embed_dropout"),
        ({"embed_dropout": -0.1}, "embed_dropout"),
        ({"weight_decay": -1e-3}, "weight_decay"),
    ],
)
def test_a_preset_refuses_dropout_it_cannot_apply_and_negative_decay(
    bad: dict[str, float], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        get_preset("tiny").with_overrides(**bad)
