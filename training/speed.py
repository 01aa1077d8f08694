"""Training throughput against the model's raw forward/backward throughput.

    python -m training.speed --data PATH [--preset book] [--recipes 1280] [--raw-batches 8]

raw: forward, cross-entropy and backward of the same model (same vocabulary, batch and
window) on random token batches: no data, no optimiser, no metrics. training: the real
loop (`training.train.train`) for two epochs on the first N recipes of the corpus; the
second epoch's tokens/s is used, the first warms up. Raw is measured before and after
training and averaged, so a machine that gets busier or quieter shows in the spread.
Tokens are window positions (B * T per batch), padding included, in both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from simmer.tokenizer import Tokenizer
from training.data import CorpusError, load_corpus, split_train_val
from training.model import LSTMConfig, RecipeLSTM
from training.presets import TrainConfig, get_preset
from training.train import train


def raw_tokens_per_s(model_config: LSTMConfig, config: TrainConfig, batches: int) -> float:
    """Forward + loss + backward on random (B, T) batches, after two warm-up batches."""
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
    started = time.perf_counter()
    for _ in range(batches):
        step()
    return batches * x.numel() / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.speed", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--data", required=True, help="corpus file (any format training reads)")
    parser.add_argument("--preset", default="book", help="model and batch settings (default book)")
    parser.add_argument("--recipes", type=int, default=1280, help="training subset (default 1280)")
    parser.add_argument("--raw-batches", type=int, default=8, help="timed raw batches (default 8)")
    args = parser.parse_args(argv)
    try:
        config = get_preset(args.preset).with_overrides(
            epochs=2, max_recipes=args.recipes, sample_tokens=1
        )
        texts = load_corpus(args.data, config.max_recipes)
    except (CorpusError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train_idx, _ = split_train_val(len(texts), config.val_fraction, config.seed)
    vocab = Tokenizer.train((texts[i] for i in train_idx), config.vocab_size).vocab_size
    model_config = LSTMConfig(
        vocab_size=vocab,
        embedding_dim=config.embedding_dim,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        dropout=config.dropout,
    )
    raw = [raw_tokens_per_s(model_config, config, args.raw_batches)]
    with tempfile.TemporaryDirectory() as out:
        history = train(texts, config, out).history
    raw.append(raw_tokens_per_s(model_config, config, args.raw_batches))
    trained = history[-1]["tokens_per_s"]
    raw_mean = sum(raw) / len(raw)
    result = {
        "preset": args.preset,
        "model": model_config.to_dict(),
        "batch": [config.batch_size, config.seq_len],
        "threads": torch.get_num_threads(),
        "raw_tokens_per_s": [round(r) for r in raw],
        "training_tokens_per_s": round(trained),
        "ratio": round(trained / raw_mean, 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
