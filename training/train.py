"""The training loop: epochs, validation, metrics, checkpoints, samples, plot, DDP.

The loss is cross-entropy over every word target and the stop token: the first pad
after a recipe's last word is a target (that is how the model learns to end a recipe),
and the padding after it is ignored. Words are never id 0, so a target is kept exactly
when its *input* is a word: mask = inputs != 0.

Each epoch also reports the book-comparable unmasked loss (every position, padding
included, as Keras computes it) and the loss over word targets alone.

Under torchrun every process trains on its DistributedSampler shard through
DistributedDataParallel. Each process divides its summed loss by the number of targets
in the *global* batch (times the world size, which DDP's gradient average undoes), so
N processes with batch B step exactly like one process with batch N * B. Only rank 0
writes files and logs.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, TensorDataset

from simmer.files import atomic_write_bytes, atomic_write_json
from simmer.tokenizer import PAD_ID, Tokenizer
from training.checkpoint import (
    BEST,
    CHECKPOINT,
    METRICS,
    PLOT,
    TOKENIZER,
    CheckpointError,
    checkpoint_payload,
    save_checkpoint,
)
from training.data import encode_windows, split_train_val, tail_windows
from training.model import LSTMConfig, RecipeLSTM
from training.presets import LossMask, TrainConfig
from training.sampling import generate

SAMPLE_PROMPT = "recipe for"
# Settings that decide which texts are validation and what a window is: fixed for a run.
SPLIT_SETTINGS = ("seed", "val_fraction", "seq_len")
Progress = Callable[[int, int, dict[str, float]], None]


# ---------------------------------------------------------------------------- runtime
@dataclass(frozen=True)
class Placement:
    """Where a run executes: its device and its place in a data-parallel world."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, file=sys.stderr, flush=True)


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The device a --device name means: "auto" is CUDA when present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {name!r}; choose from auto, cpu, cuda")


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def start_runtime(device: str = "auto") -> Placement:
    """The runtime for this process; under torchrun, join the process group first.

    torchrun passes RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in the
    environment, which `init_process_group` reads: NCCL on CUDA, gloo on the CPU.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if not launched_by_torchrun():
        return Placement(chosen)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return Placement(chosen, rank=dist.get_rank(), world_size=dist.get_world_size())


def stop_runtime(runtime: Placement, finished: bool = True) -> None:
    """Leave the process group; after a clean finish, wait for every process first."""
    if runtime.distributed:
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def all_sum(runtime: Placement, values: torch.Tensor) -> torch.Tensor:
    """`values` summed over every process (itself when not distributed)."""
    if runtime.distributed:
        values = values.clone()
        dist.all_reduce(values)
    return values


# ---------------------------------------------------------------------------- losses
def stop_aware_mask(x: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the targets that count. Words, and the first pad after the last word.

    A target y[t] = window[t + 1] counts when its input x[t] is a word: so the first pad
    (input: the last word) is the stop target, and later pads (input: a pad) are not.
    """
    return x != PAD_ID


def losses(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summed cross-entropy and target counts for the three masks, from one pass.

    logits (B, T, V); x, y (B, T). Keys: "<mask>_sum" and "<mask>_n" for mask in
    stop (words + stop token), none (every position, as Keras) and pads (words only).
    """
    ce = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="none"
    ).view_as(y)  # (B, T)
    stop = stop_aware_mask(x)
    words = y != PAD_ID
    return {
        "stop_sum": (ce * stop).sum(),
        "stop_n": stop.sum(),
        "none_sum": ce.sum(),
        "none_n": torch.tensor(ce.numel(), device=ce.device),
        "pads_sum": (ce * words).sum(),
        "pads_n": words.sum(),
    }


LOSS_KEYS = ("stop_sum", "stop_n", "none_sum", "none_n", "pads_sum", "pads_n")


def counted_targets(
    x: torch.Tensor, y: torch.Tensor, count_from: torch.Tensor, mask: LossMask
) -> torch.Tensor:
    """(B, T) bool: the targets a training step counts under `mask` ("stop" or "pads").

    Row b counts nothing before target index count_from[b] (a tail window's context).
    """
    keep = stop_aware_mask(x) if mask == "stop" else y != PAD_ID
    index = torch.arange(x.size(1), device=x.device)
    return keep & (index[None, :] >= count_from[:, None])


def selected_losses(
    logits: torch.Tensor, y: torch.Tensor, stop_weight: float = 1.0
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Losses over the counted targets alone: logits (K, V), their targets y (K,).

    Returns the `LOSS_KEYS` parts (the unmasked loss, which needs every position, is
    reported as zero targets) and the training objective: the summed cross-entropy
    with the stop targets weighted by `stop_weight`.
    """
    ce = F.cross_entropy(logits.float(), y, reduction="none")  # (K,)
    words = y != PAD_ID
    nothing = torch.zeros((), device=ce.device)
    parts = {
        "stop_sum": ce.sum(),
        "stop_n": torch.tensor(ce.numel(), device=ce.device),
        "none_sum": nothing,
        "none_n": nothing,
        "pads_sum": (ce * words).sum(),
        "pads_n": words.sum(),
    }
    objective = (ce * torch.where(words, 1.0, stop_weight)).sum()
    return parts, objective


class Summary(TypedDict):
    loss: float
    loss_unmasked: float | None  # None when not every position was computed
    loss_words: float


def summarise(totals: torch.Tensor) -> Summary:
    """Mean losses from summed `LOSS_KEYS` values."""
    t = dict(zip(LOSS_KEYS, totals.tolist(), strict=True))
    return {
        "loss": t["stop_sum"] / max(1.0, t["stop_n"]),
        "loss_unmasked": t["none_sum"] / t["none_n"] if t["none_n"] else None,
        "loss_words": t["pads_sum"] / max(1.0, t["pads_n"]),
    }


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from lr to lr * min_lr_ratio."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA; full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(
    model: RecipeLSTM, windows: torch.Tensor, batch_size: int, runtime: Placement
) -> Summary:
    """Validation losses; each process takes every world_size-th window, then sums."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=runtime.device)
    shard = windows[runtime.rank :: runtime.world_size]
    for start in range(0, len(shard), batch_size):
        batch = shard[start : start + batch_size]
        x, y = batch[:, :-1], batch[:, 1:]
        with autocast(runtime.device):
            logits, _ = model(x)
        parts = losses(logits, x, y)
        totals += torch.stack([parts[k].double() for k in LOSS_KEYS])
    model.train(was_training)
    return summarise(all_sum(runtime, totals))


# ---------------------------------------------------------------------------- outputs
def corpus_fingerprint(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def write_loss_plot(history: list[dict[str, Any]], path: Path) -> None:
    """The book's Figure 5-8: training and validation loss by epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="training (stop-aware)")
    if any(h.get("val_loss") is not None for h in history):
        ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation (stop-aware)")
        ax.plot(
            epochs,
            [h["val_loss_words"] for h in history],
            "s:",
            label="validation, word targets only",
        )
    unmasked = [h["train_loss_unmasked"] for h in history]
    if all(value is not None for value in unmasked):  # only a "none"-mask run has it
        ax.plot(epochs, unmasked, "--", color="grey", label="training, unmasked (as Keras)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("Recipe LSTM: loss by epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    out_dir: Path


def resume_config(payload: dict[str, Any], epochs: int | None = None) -> TrainConfig:
    """The run's own settings from its checkpoint; `epochs` may extend it."""
    return TrainConfig.from_dict(payload["train_config"]).with_overrides(epochs=epochs)


def check_resumable(
    payload: dict[str, Any], texts: list[str], fingerprint: str, config: TrainConfig
) -> None:
    """Refuse to resume on other data, or with a split or window that would differ."""
    corpus = payload.get("corpus", {})
    if corpus.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"--resume: the corpus differs from the checkpoint's "
            f"({len(texts)} texts here, {corpus.get('texts')} there)"
        )
    saved = payload["train_config"]
    changed = [k for k in SPLIT_SETTINGS if saved.get(k) != getattr(config, k)]
    if changed:
        raise CheckpointError(f"--resume: {', '.join(changed)} differ from the checkpoint's")


# ---------------------------------------------------------------------------- the loop
def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, decaying the matrices (embedding, LSTM and output weights) but not biases.

    With `weight_decay` 0 this is the book's Adam.
    """
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": matrices, "weight_decay": config.weight_decay},
        {"params": vectors, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr)


def batches(order: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def train(
    texts: list[str],
    config: TrainConfig,
    out_dir: str | Path,
    progress: Progress | None = None,
    *,
    resume: dict[str, Any] | None = None,
    runtime: Placement | None = None,
    tokenizer: Tokenizer | None = None,
) -> TrainResult:
    """Train on `texts`; write checkpoint, best checkpoint, tokenizer, metrics and plot.

    `resume` is a checkpoint dict (see `training.checkpoint.load_checkpoint`) to continue
    from: its tokenizer, weights, optimiser, epoch, history and RNG state are restored.
    `tokenizer` fixes the vocabulary of a fresh run (default: learnt from the training
    split). Nothing is written to `out_dir` before the first epoch ends.
    """
    rt = runtime or Placement(torch.device("cpu"))
    out = Path(out_dir)
    torch.manual_seed(config.seed)

    train_idx, val_idx = split_train_val(len(texts), config.val_fraction, config.seed)
    fingerprint = corpus_fingerprint(texts)
    if resume is None:
        tokenizer = tokenizer or Tokenizer.train((texts[i] for i in train_idx), config.vocab_size)
    else:
        check_resumable(resume, texts, fingerprint, config)
        tokenizer = Tokenizer.from_dict(resume["tokenizer"])
    windows = torch.from_numpy(encode_windows(texts, tokenizer, config.seq_len))
    train_windows = windows[train_idx]  # (N, T + 1)
    count_from = torch.zeros(len(train_idx), dtype=torch.long)  # (N,)
    if config.tail_windows:
        tails, tails_from = tail_windows(
            [texts[i] for i in train_idx], tokenizer, config.seq_len, config.tail_burn_in
        )
        train_windows = torch.cat([train_windows, torch.from_numpy(tails)])
        count_from = torch.cat([count_from, torch.from_numpy(tails_from)])
    train_windows, count_from = train_windows.to(rt.device), count_from.to(rt.device)
    val_windows = windows[val_idx].to(rt.device)

    model_config = LSTMConfig.for_training(config, tokenizer.vocab_size)
    if resume is not None and LSTMConfig.from_dict(resume["model_config"]) != model_config:
        raise CheckpointError("--resume: the model settings differ from the checkpoint's")
    model = RecipeLSTM(model_config)
    optimizer = make_optimizer(model, config)
    history: list[dict[str, Any]] = []
    best = math.inf
    done_epochs = step = 0
    if resume is not None:
        model.load_state_dict(resume["model_state"])
        optimizer.load_state_dict(resume["optimizer_state"])
        history = list(resume["history"])
        best = float(resume.get("best_val_loss", math.inf))
        done_epochs, step = int(resume["epoch"]), int(resume.get("step", 0))
        if "rng_state" in resume:
            torch.set_rng_state(resume["rng_state"])
        if rt.device.type == "cuda" and resume.get("cuda_rng_state") is not None:
            torch.cuda.set_rng_state(resume["cuda_rng_state"], rt.device)
    model.to(rt.device)
    for state in optimizer.state.values():  # Adam's moments follow the parameters
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(rt.device)
    trainable: nn.Module = model
    if rt.distributed:
        trainable = DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )

    sampler: DistributedSampler[tuple[torch.Tensor, ...]] = DistributedSampler(
        TensorDataset(train_windows),
        num_replicas=rt.world_size,
        rank=rt.rank,
        shuffle=True,
        seed=config.seed,
    )
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    rt.log(f"model: {model.num_parameters():,} parameters ({model_config})")
    rt.log(
        f"data: {len(train_idx)} train, {len(val_idx)} validation texts, "
        f"vocab {tokenizer.vocab_size}, {config.seq_len + 1}-token windows"
        + (f", {len(train_windows) - len(train_idx)} tail windows" if config.tail_windows else "")
    )
    rt.log(
        f"run: device {rt.device}, world size {rt.world_size}, batch {config.batch_size} per "
        f"process ({config.batch_size * rt.world_size} global), {steps_per_epoch} steps per "
        f"epoch, loss mask {config.loss_mask!r}"
    )
    if done_epochs:
        rt.log(f"resuming after epoch {done_epochs} (step {step})")
    if done_epochs >= config.epochs:
        rt.log(f"nothing to do: {done_epochs} of {config.epochs} epochs already trained")
        return TrainResult(history=history, out_dir=out)

    for epoch in range(done_epochs + 1, config.epochs + 1):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long, device=rt.device)
        totals = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=rt.device)
        seen = 0  # input positions, over every process
        for batch_no, rows in enumerate(batches(order, config.batch_size), 1):
            batch = train_windows[rows]  # (B, T + 1)
            x, y = batch[:, :-1], batch[:, 1:]  # (B, T) each
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, config)
            if config.loss_mask == "none":  # every position, as Keras
                with autocast(rt.device):
                    logits, _ = trainable(x)  # (B, T, V)
                parts = losses(logits, x, y)
                objective = parts["none_sum"]
            else:  # the output layer runs only where a target counts
                counted = counted_targets(x, y, count_from[rows], config.loss_mask)
                with autocast(rt.device):
                    logits, _ = trainable(x, positions=counted)  # (K, V)
                parts, objective = selected_losses(logits, y[counted], config.stop_weight)
            # Divide by the global target count: every target weighs the same however
            # the batch is split over processes (DDP averages, so scale by world size).
            count = all_sum(rt, parts[f"{config.loss_mask}_n"].detach().float())
            loss = objective * rt.world_size / count.clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            step += 1
            seen += x.numel() * rt.world_size
            totals += torch.stack([parts[k].detach().double() for k in LOSS_KEYS])
            if progress is not None and rt.is_main:
                elapsed = time.perf_counter() - started
                mask = config.loss_mask
                progress(
                    batch_no,
                    steps_per_epoch,
                    {
                        "loss": float(totals[LOSS_KEYS.index(f"{mask}_sum")])
                        / max(1.0, float(totals[LOSS_KEYS.index(f"{mask}_n")])),
                        "tokens_per_s": seen / elapsed,
                    },
                )
        totals = all_sum(rt, totals)
        train_seconds = time.perf_counter() - started
        train_stats = summarise(totals)
        val = evaluate(model, val_windows, 2 * config.batch_size, rt) if len(val_idx) else None
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": train_stats["loss"],
            "train_loss_unmasked": train_stats["loss_unmasked"],
            "train_loss_words": train_stats["loss_words"],
            "val_loss": val["loss"] if val else None,
            "val_loss_unmasked": val["loss_unmasked"] if val else None,
            "val_loss_words": val["loss_words"] if val else None,
            "val_perplexity": math.exp(val["loss"]) if val else None,
            "val_perplexity_words": math.exp(val["loss_words"]) if val else None,
            "tokens_per_s": seen / train_seconds,
            "train_seconds": train_seconds,
            "lr": optimizer.param_groups[0]["lr"],
            "world_size": rt.world_size,
        }
        if not rt.is_main:
            continue
        generator = torch.Generator().manual_seed(config.seed + epoch)
        record["samples"] = {
            str(t): generate(model, tokenizer, SAMPLE_PROMPT, config.sample_tokens, t, generator)
            for t in config.sample_temperatures
        }
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        score = record["val_loss"] if val else record["train_loss"]
        improved = score < best
        best = min(best, score)
        rt.log(epoch_line(record, config.epochs))
        for temperature, text in record["samples"].items():
            rt.log(f"  sample T={temperature}: {text}")
        payload = checkpoint_payload(
            model,
            optimizer,
            config.to_dict(),
            tokenizer,
            epoch,
            history,
            step=step,
            best_val_loss=best,
            rng_state=torch.get_rng_state(),
            cuda_rng_state=torch.cuda.get_rng_state() if rt.device.type == "cuda" else None,
            corpus={"texts": len(texts), "fingerprint": fingerprint},
        )
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out / TOKENIZER)
        save_checkpoint(out / CHECKPOINT, payload)
        if improved:
            save_checkpoint(out / BEST, payload)
        atomic_write_json(out / METRICS, {"epochs": history, "best_val_loss": best})
    if rt.is_main:
        write_loss_plot(history, out / PLOT)
        rt.log(f"wrote {out / CHECKPOINT}, {out / BEST}, {out / METRICS} and {out / PLOT}")
    return TrainResult(history=history, out_dir=out)


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    return (
        f"epoch {record['epoch']}/{epochs}: train {fmt(record['train_loss'])} "
        f"(unmasked {fmt(record['train_loss_unmasked'])}) | val {fmt(record['val_loss'])} "
        f"(unmasked {fmt(record['val_loss_unmasked'])}, words {fmt(record['val_loss_words'])}) "
        f"| {record['tokens_per_s']:,.0f} tok/s, {record['seconds']:.1f}s"
    )
