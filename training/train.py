"""The training loop: epochs, validation, metrics, checkpoints and samples.

The loss is cross-entropy over every word target and the stop token: the first pad
after a recipe's last word is a target (that is how the model learns to end a recipe),
and the padding after it is ignored. Because words are never id 0, a target is kept
exactly when its *input* is a word: mask = inputs != 0.

Each epoch also reports the book-comparable unmasked loss (every position, padding
included, as Keras computes it) and the loss over word targets alone.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simmer.files import atomic_write_json
from simmer.tokenizer import PAD_ID, Tokenizer
from training.model import LSTMConfig, RecipeLSTM
from training.presets import TrainConfig

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.json"
TOKENIZER = "tokenizer.json"
CHECKPOINT_FORMAT = "simmer-checkpoint"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def losses(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums and counts for the three losses, from one cross-entropy pass."""
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="none")
    ce = ce.view_as(y)  # (B, T)
    stop_aware = x != PAD_ID
    words = y != PAD_ID
    return {
        "masked_sum": (ce * stop_aware).sum(),
        "masked_n": stop_aware.sum(),
        "unmasked_sum": ce.sum(),
        "unmasked_n": torch.tensor(ce.numel()),
        "words_sum": (ce * words).sum(),
        "words_n": words.sum(),
    }


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from lr to lr * min_lr_ratio."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, batch_size: int) -> dict[str, float]:
    model.eval()
    totals: dict[str, float] = {}
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        x, y = batch[:, :-1], batch[:, 1:]
        logits, _ = model(x)
        for key, value in losses(logits, x, y).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    model.train()
    return {
        "loss": totals["masked_sum"] / max(1.0, totals["masked_n"]),
        "loss_unmasked": totals["unmasked_sum"] / max(1.0, totals["unmasked_n"]),
        "loss_words": totals["words_sum"] / max(1.0, totals["words_n"]),
    }


@torch.no_grad()
def sample(
    model: RecipeLSTM, tokenizer: Tokenizer, prompt: str, max_tokens: int, temperature: float,
    generator: torch.Generator,
) -> str:
    """The book's TextGenerator callback, statefully: feed the prompt once, then step."""
    model.eval()
    ids = tokenizer.encode(prompt)
    logits, state = model(torch.tensor([ids]))
    out: list[int] = []
    for _ in range(max_tokens):
        probs = torch.softmax(logits[0, -1].float() / temperature, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
        if token == PAD_ID:
            break
        out.append(token)
        logits, state = model(torch.tensor([[token]]), state)
    model.train()
    return prompt + tokenizer.decode(out, context=ids)


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    out_dir: Path


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save through a temporary file and a rename: never a half-written checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def train(
    texts: list[str],
    config: TrainConfig,
    out_dir: str | Path,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train on `texts` and write checkpoint, best checkpoint, tokenizer and metrics to `out_dir`."""
    from training.data import encode_windows, split_train_val

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)

    train_idx, val_idx = split_train_val(len(texts), config.val_fraction, config.seed)
    tokenizer = Tokenizer.train((texts[i] for i in train_idx), config.vocab_size)
    windows = torch.from_numpy(encode_windows(texts, tokenizer, config.seq_len))
    train_windows, val_windows = windows[train_idx], windows[val_idx]

    model_config = LSTMConfig(
        vocab_size=tokenizer.vocab_size,
        embedding_dim=config.embedding_dim,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        dropout=config.dropout,
    )
    model = RecipeLSTM(model_config)
    log(f"model: {model.num_parameters():,} parameters ({model_config})")
    log(f"data: {len(train_windows)} train, {len(val_windows)} validation recipes, vocab {tokenizer.vocab_size}")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    tokenizer.save(out / TOKENIZER)

    steps_per_epoch = math.ceil(len(train_windows) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []
    best = math.inf
    step = 0
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        order = torch.randperm(len(train_windows), generator=generator)
        sums = {"masked": 0.0, "masked_n": 0.0, "unmasked": 0.0, "unmasked_n": 0.0}
        positions = 0
        for batch_no, start in enumerate(range(0, len(order), config.batch_size), 1):
            batch = train_windows[order[start : start + config.batch_size]]
            x, y = batch[:, :-1], batch[:, 1:]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, config)
            logits, _ = model(x)
            parts = losses(logits, x, y)
            loss = parts["masked_sum"] / parts["masked_n"].clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            step += 1
            positions += x.numel()
            sums["masked"] += float(parts["masked_sum"].detach())
            sums["masked_n"] += float(parts["masked_n"])
            sums["unmasked"] += float(parts["unmasked_sum"].detach())
            sums["unmasked_n"] += float(parts["unmasked_n"])
            if progress is not None:
                elapsed = time.perf_counter() - started
                progress(batch_no, steps_per_epoch, {
                    "loss": sums["masked"] / max(1.0, sums["masked_n"]),
                    "tokens_per_s": positions / max(elapsed, 1e-9),
                })
        seconds = time.perf_counter() - started
        val = evaluate(model, val_windows, 64) if len(val_windows) else {}
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": sums["masked"] / max(1.0, sums["masked_n"]),
            "train_loss_unmasked": sums["unmasked"] / max(1.0, sums["unmasked_n"]),
            "val_loss": val.get("loss"),
            "val_loss_unmasked": val.get("loss_unmasked"),
            "val_loss_words": val.get("loss_words"),
            "val_perplexity": math.exp(val["loss"]) if val else None,
            "tokens_per_s": positions / seconds,
            "seconds": seconds,
            "lr": optimizer.param_groups[0]["lr"],
        }
        samples = {
            str(t): sample(model, tokenizer, "recipe for", config.sample_tokens, t, generator)
            for t in config.sample_temperatures
        }
        record["samples"] = samples
        history.append(record)
        log(
            f"epoch {epoch}/{config.epochs}: train {record['train_loss']:.4f} "
            f"(unmasked {record['train_loss_unmasked']:.4f}) val {record['val_loss'] or float('nan'):.4f} "
            f"words {record['val_loss_words'] or float('nan'):.4f} "
            f"{record['tokens_per_s']:,.0f} tok/s {seconds:.1f}s"
        )
        for temperature, text in samples.items():
            log(f"  sample T={temperature}: {text}")
        payload = {
            "format": CHECKPOINT_FORMAT,
            "format_version": 1,
            "model_config": model_config.to_dict(),
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "train_config": config.to_dict(),
            "tokenizer_file": TOKENIZER,
            "epoch": epoch,
            "step": step,
            "history": history,
        }
        save_checkpoint(out / CHECKPOINT, payload)
        score = record["val_loss"] if record["val_loss"] is not None else record["train_loss"]
        if score < best:
            best = score
            save_checkpoint(out / BEST, payload)
        atomic_write_json(out / METRICS, {"epochs": history, "best_val_loss": best})
    return TrainResult(history=history, out_dir=out)
