"""Every default of the export job, in one place (imports nothing heavy, for the CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_OPSET = 17


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    quantize: Literal["int8"] | None = None
    data: Path | None = None  # the training corpus: held-out text for parity and the int8 loss
    max_quant_loss_increase: float = 0.02  # refuse int8 past this validation-loss increase
    force: bool = False  # write an int8 bundle past the threshold anyway
    val_recipes: int = 256  # held-out recipes scored for the validation loss
