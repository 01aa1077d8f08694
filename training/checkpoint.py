"""The checkpoint format: a plain dict saved with torch.save, written atomically.

A training folder holds `checkpoint.pt` (the latest epoch, for --resume), `best.pt`
(the best validation loss, for export), `tokenizer.json` and `metrics.json`. Each
checkpoint holds at least:

    format            "simmer-checkpoint"
    format_version    1
    model_config      dict for `LSTMConfig.from_dict`
    model_state       the RecipeLSTM state dict (CPU tensors)
    optimizer_state   the Adam state dict
    train_config      dict for `TrainConfig.from_dict`
    tokenizer_file    "tokenizer.json", next to the checkpoint
    epoch, step       epochs and optimiser steps done
    history           one dict of metrics per epoch (train_loss, val_loss, ...)

and also `tokenizer` (the vocabulary, so a checkpoint stands alone), `best_val_loss`,
`rng_state` (so a resumed run draws the same dropout masks) and `corpus` (the size
and fingerprint of the texts it was trained on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from simmer.files import atomic_write
from simmer.tokenizer import Tokenizer, TokenizerError
from training.model import LSTMConfig, RecipeLSTM

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.json"
TOKENIZER = "tokenizer.json"
PLOT = "loss.png"
FORMAT = "simmer-checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("model_config", "model_state", "optimizer_state", "train_config", "epoch", "history")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line."""


def checkpoint_payload(
    model: RecipeLSTM,
    optimizer: torch.optim.Optimizer,
    train_config: dict[str, Any],
    tokenizer: Tokenizer,
    epoch: int,
    history: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """The checkpoint dict for `model` after `epoch` epochs, every required key filled;
    `extra` adds the optional ones (step, best_val_loss, rng_state, corpus...)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer_state": optimizer.state_dict(),
        "train_config": train_config,
        "tokenizer_file": TOKENIZER,
        "tokenizer": tokenizer.to_dict(),
        "epoch": epoch,
        "history": history,
        **extra,
    }


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, with tensors on the CPU; CheckpointError if it is not one."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint not found: {file}")
    try:
        # weights_only: the payload is plain containers, tensors and numbers, and
        # unpickling anything else could run code from the file.
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        objects = _pickled_objects(file)
        if objects:
            raise CheckpointError(
                f"refusing checkpoint {file}: it holds Python objects ({', '.join(objects)}) "
                "that only unpickling could build, and unpickling can run arbitrary code"
            ) from exc
        raise CheckpointError(f"cannot read checkpoint {file}: {type(exc).__name__}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"not a simmer checkpoint: {file}")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {payload.get('format_version')!r} is not "
            f"{FORMAT_VERSION}: {file}"
        )
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint lacks {', '.join(missing)}: {file}")
    return payload


def _pickled_objects(file: Path) -> list[str]:
    """The classes and functions a torch.save file names beyond weights_only's allowlist,
    read from its pickle opcodes without running them; [] for a file torch cannot parse."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(file))
    except Exception:  # not a torch.save zip file: the caller reports it as unreadable
        return []


def load_model(path: str | Path) -> tuple[RecipeLSTM, dict[str, Any]]:
    """The model in eval mode and its checkpoint dict."""
    payload = load_checkpoint(path)
    try:
        model = RecipeLSTM(LSTMConfig.from_dict(payload["model_config"]))
        model.load_state_dict(payload["model_state"])
    except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint weights do not match its config: {path}") from exc
    return model.eval(), payload


def load_tokenizer(path: str | Path, payload: dict[str, Any]) -> Tokenizer:
    """The checkpoint's own vocabulary, else its tokenizer file next to it."""
    try:
        if "tokenizer" in payload:
            return Tokenizer.from_dict(payload["tokenizer"])
        return Tokenizer.load(Path(path).parent / payload.get("tokenizer_file", TOKENIZER))
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from exc


def resolve(path: str | Path) -> Path:
    """A training folder means its best.pt (else checkpoint.pt); a file means itself."""
    given = Path(path)
    if given.is_dir():
        for name in (BEST, CHECKPOINT):
            if (given / name).is_file():
                return given / name
        return given / CHECKPOINT
    return given
