"""The book's recipe LSTM: Embedding -> LSTM -> Linear over the vocabulary.

With the book's sizes (vocabulary 10,000, embedding 100, one LSTM layer of 128 units)
it has 2,407,760 parameters; PyTorch's LSTM keeps two bias vectors per gate where
Keras keeps one, which is 512 parameters more than the book's summary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from training.presets import TrainConfig


@dataclass(frozen=True)
class LSTMConfig:
    vocab_size: int = 10_000
    embedding_dim: int = 100
    hidden_size: int = 128
    num_layers: int = 1  # 2 is the book's stacked variant
    dropout: float = 0.0  # between layers and before the output layer; 0 is the book's
    embed_dropout: float = 0.0  # on the embeddings, before the LSTM; 0 is the book's

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LSTMConfig:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})

    @classmethod
    def for_training(cls, config: TrainConfig, vocab_size: int) -> LSTMConfig:
        """The model a training run builds: its config's sizes, its tokenizer's vocabulary."""
        return cls(
            vocab_size=vocab_size,
            embedding_dim=config.embedding_dim,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout,
            embed_dropout=config.embed_dropout,
        )


State = tuple[torch.Tensor, torch.Tensor]


class RecipeLSTM(nn.Module):
    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=0)
        self.lstm = nn.LSTM(
            config.embedding_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(config.dropout)
        self.embed_dropout = nn.Dropout(config.embed_dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(
        self,
        tokens: torch.Tensor,
        state: State | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State]:
        """Logits at every position (B, T, V) and the state after the last one.

        With `positions`, a (B, T) bool mask, only those positions pass through the
        output layer, where nearly all the FLOPs are: (K, V) for its K true entries.
        """
        x = self.embed_dropout(self.embedding(tokens))  # (B, T, E)
        # The recurrence stays fp32 under autocast: it is latency-bound, and cuDNN's bf16
        # LSTM is recent. The output layer, where the FLOPs are, runs in bf16 on CUDA.
        with torch.autocast(x.device.type, enabled=False):
            out, (h, c) = self.lstm(x.float(), state)  # (B, T, H); h, c: (L, B, H)
        if positions is not None:
            out = out[positions]  # (K, H)
        return self.head(self.dropout(out)), (h, c)  # (B, T, V) or (K, V)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class LastStepLSTM(nn.Module):
    """The serving graph: explicit (h, C) in and out, logits for the last position only."""

    def __init__(self, model: RecipeLSTM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.model.embedding(tokens)  # (B, T, E)
        out, (hn, cn) = self.model.lstm(x, (h0, c0))  # (B, T, H); hn, cn: (L, B, H)
        logits = self.model.head(out[:, -1, :])  # (B, V)
        return logits, hn, cn
