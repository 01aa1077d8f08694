"""Training presets: every default of the training job, in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    # model (the book's: Embedding(10000, 100) -> LSTM(128) -> Linear(10000))
    vocab_size: int = 10_000
    embedding_dim: int = 100
    hidden_size: int = 128
    num_layers: int = 1
    dropout: float = 0.0
    # data
    seq_len: int = 200  # the book keeps the first 201 tokens: 200 inputs, 200 targets
    val_fraction: float = 0.1
    max_recipes: int | None = None
    # optimisation (the book: Adam, lr 1e-3, batch 32)
    epochs: int = 25
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 1.0  # cosine decay to lr * min_lr_ratio; 1.0 keeps lr constant
    warmup_steps: int = 0
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    seed: int = 42
    # the book's sampling callback after each epoch
    sample_tokens: int = 60
    sample_temperatures: tuple[float, ...] = (1.0, 0.2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


PRESETS: dict[str, TrainConfig] = {
    # seconds on a laptop core: for tests
    "tiny": TrainConfig(
        vocab_size=500, embedding_dim=16, hidden_size=32, seq_len=48, epochs=2,
        batch_size=16, lr=3e-3, sample_tokens=12,
    ),
    # at most 3 minutes on 2 CPU cores: the first-run default
    "quick": TrainConfig(
        seq_len=120, epochs=3, batch_size=32, lr=3e-3, min_lr_ratio=0.1, warmup_steps=20,
        sample_tokens=40,
    ),
    # the book's configuration, 25 epochs, with the stop-aware mask and a cosine schedule
    "book": TrainConfig(epochs=25, min_lr_ratio=0.1, warmup_steps=100, dropout=0.1),
}


def get_preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
