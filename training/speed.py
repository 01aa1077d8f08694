"""Training throughput against the model's raw forward/backward throughput.

    python -m training.speed --data PATH [--preset book] [--recipes 1280] [--raw-batches 16]

raw: forward, cross-entropy and backward of the same model (same vocabulary, batch and
window) on random token batches: no data, no optimiser, no metrics. training: the real
loop (`training.train.train`) for two epochs on the first N recipes, with the vocabulary
learnt from the whole corpus (so the model is the preset's size). Tokens are window
positions (B * T per batch), padding included, in both.

Both are timed batch by batch and compared by their median batch time, which a shared
machine's bursts of load move far less than a mean: the raw batches before and after
training, and every training batch but the first of each epoch (the time between two
progress callbacks, so data, loss bookkeeping, clipping and the optimiser all count).
The epochs' own tokens/s (the number in metrics.json) is printed too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from simmer.tokenizer import Tokenizer
from training.data import CorpusError, load_corpus, split_train_val
from training.malloc import reuse_freed_memory
from training.model import LSTMConfig, RecipeLSTM
from training.presets import TrainConfig, get_preset
from training.train import train


def raw_batch_seconds(model_config: LSTMConfig, config: TrainConfig, batches: int) -> list[float]:
    """Seconds of forward + loss + backward per random (B, T) batch, after two warm-ups."""
    torch.manual_seed(config.seed)
    model = RecipeLSTM(model_config)
    tokens = torch.randint(2, model_config.vocab_size, (config.batch_size, config.seq_len + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]  # (B, T)

    def step() -> None:
        logits, _ = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        model.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)

    for _ in range(2):
        step()
    seconds = []
    for _ in range(batches):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    return seconds


def training_batch_seconds(
    texts: list[str], config: TrainConfig, tokenizer: Tokenizer
) -> tuple[list[float], list[float]]:
    """Seconds per training batch (first of each epoch left out) and each epoch's tokens/s."""
    stamps: list[float] = []
    seconds: list[float] = []

    def progress(batch: int, total: int, stats: dict[str, float]) -> None:
        now = time.perf_counter()
        if batch > 1:
            seconds.append(now - stamps[-1])
        stamps.append(now)

    with tempfile.TemporaryDirectory() as out:
        history = train(texts, config, out, progress, tokenizer=tokenizer).history
    return seconds, [h["tokens_per_s"] for h in history]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.speed", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--data", required=True, help="corpus file (any format training reads)")
    parser.add_argument("--preset", default="book", help="model and batch settings (default book)")
    parser.add_argument("--recipes", type=int, default=1280, help="training subset (default 1280)")
    parser.add_argument("--raw-batches", type=int, default=16, help="timed raw batches (16)")
    args = parser.parse_args(argv)
    try:
        config = get_preset(args.preset).with_overrides(epochs=2, sample_tokens=1)
        texts = load_corpus(args.data)
        subset = texts[: args.recipes]
        if len(subset) < 2:
            raise ValueError("--recipes must be at least 2")
    except (CorpusError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train_idx, _ = split_train_val(len(texts), config.val_fraction, config.seed)
    tokenizer = Tokenizer.train((texts[i] for i in train_idx), config.vocab_size)
    model_config = LSTMConfig.for_training(config, tokenizer.vocab_size)
    raw = raw_batch_seconds(model_config, config, args.raw_batches // 2)
    trained, epochs = training_batch_seconds(subset, config, tokenizer)
    raw += raw_batch_seconds(model_config, config, args.raw_batches - args.raw_batches // 2)
    tokens = config.batch_size * config.seq_len
    result = {
        "preset": args.preset,
        "model": model_config.to_dict(),
        "parameters": RecipeLSTM(model_config).num_parameters(),
        "batch": [config.batch_size, config.seq_len],
        "threads": torch.get_num_threads(),
        "raw_tokens_per_s": round(tokens / statistics.median(raw)),
        "training_tokens_per_s": round(tokens / statistics.median(trained)),
        "ratio": round(statistics.median(raw) / statistics.median(trained), 3),
        "raw_batches": len(raw),
        "training_batches": len(trained),
        "epoch_tokens_per_s": [round(t) for t in epochs],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    reuse_freed_memory()  # as `python -m training` does, for both measurements
    sys.exit(main())
