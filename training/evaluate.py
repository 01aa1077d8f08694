"""Evaluate a model on a recipe corpus: losses, stopping, repetition.

    python -m training.evaluate --bundle BUNDLE --data FILE [--json OUT]
    python -m training.evaluate --checkpoint DIR_OR_PT --data FILE [--json OUT]
        [--split validation|train|all] [--samples 100] [--max-tokens 300] [--seed 0]
        [--split-seed N] [--val-fraction F] [--seq-len N] [--max-recipes N]

--bundle runs the bundle's own ONNX graph on onnxruntime, opened as the service opens it,
so what is measured is what the service serves; --checkpoint runs the torch model.

The texts are the training job's: the corpus is read as training reads it (the first
`max_recipes`), split with the run's `seed` and `val_fraction`, and cut into the run's
`seq_len + 1`-token windows, so the default (the validation split) scores exactly what
training's validation loss scored. The split settings come from the checkpoint's
train_config; a bundle records none, so for a bundle they come from the checkpoint it
was exported from when that file is still there with the sha256 the manifest records,
else from `TrainConfig`'s defaults. The --split-seed, --val-fraction, --seq-len and
--max-recipes flags override them. A tokenizer trained on the split's training texts
must reproduce the model's vocabulary, else a warning says the split is not the run's.

Losses, computed by training's own `losses` (per token step for the graph):

- loss: word targets and the stop target, training's `val_loss`;
- loss_words: every target that is not padding, training's `val_loss_words`;
- loss_stop: the stop targets alone (the first pad after a text's last word; a text
  longer than its window has none), null when no text ends inside its window;
- loss_unmasked: every position, padding included (as Keras), training's
  `val_loss_unmasked`.

Samples, `--samples` from the prompt "recipe for" at T=1.0 and at T=0.2, each at most
`--max-tokens` draws (the stop token is a draw, as in training's samples):

- stop_share: the share that end with the stop token (at T=1.0: does the model stop?);
- distinct_2: distinct word bigrams over all bigrams of the samples' generated words;
- repeat_rate: the share of 8-word windows that already occurred earlier in the same
  sample (at T=0.2: does the model loop?).

Prints a summary on stdout and, with --json, writes the same report as JSON
atomically. Bad input (a missing or unreadable corpus, checkpoint or bundle, an invalid
bundle) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from textwrap import shorten
from typing import Any, Literal, Protocol

import numpy as np
import torch

from simmer.bundle import ModelBundle, load_bundle, sha256_file
from simmer.files import atomic_write_json
from simmer.ort import open_session
from simmer.tokenizer import PAD_ID, Tokenizer
from training.__main__ import OneLineParser, fail
from training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    load_tokenizer,
    resolve,
)
from training.data import encode_windows, load_corpus, split_train_val
from training.model import RecipeLSTM
from training.presets import TrainConfig
from training.sampling import apply_temperature
from training.train import LOSS_KEYS, SAMPLE_PROMPT, losses, summarise

Split = Literal["validation", "train", "all"]
SPLITS: tuple[Split, ...] = ("validation", "train", "all")
STOP_TEMPERATURE = 1.0  # the temperature at which stopping and distinct-2 are read
REPEAT_TEMPERATURE = 0.2  # the temperature at which looping is read
REPEAT_WINDOW = 8  # words in a window that counts as a repeat
DEFAULT_SAMPLES = 100
DEFAULT_MAX_TOKENS = 300
LOSS_BATCH = 64  # windows scored per model call (per token step for the graph)
EXAMPLE_CHARS = 160  # of a sample shown in the summary

Advance = Callable[[int], object]  # moves the progress bar on by n tokens
State = tuple[np.ndarray, np.ndarray]  # h, c: float32 (L, B, H)


# ---------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class Sample:
    """One generated sample: the words drawn after the prompt, and whether it stopped."""

    words: tuple[int, ...]
    stopped: bool  # the stop token was drawn within the token budget


def stop_share(samples: Sequence[Sample]) -> float:
    """The share of samples that ended with the stop token."""
    if not samples:
        raise ValueError("no samples")
    return sum(sample.stopped for sample in samples) / len(samples)


def distinct_n(sequences: Sequence[Sequence[int]], n: int = 2) -> float | None:
    """Distinct n-grams over all n-grams of the sequences (None when there are none)."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def repeat_rate(sequences: Sequence[Sequence[int]], window: int = REPEAT_WINDOW) -> float | None:
    """The share of `window`-word windows that occurred earlier in the same sequence
    (None when no sequence is that long). Windows may overlap: a loop repeats at once."""
    repeats = total = 0
    for seq in sequences:
        seen: set[tuple[int, ...]] = set()
        for start in range(len(seq) - window + 1):
            gram = tuple(seq[start : start + window])
            total += 1
            if gram in seen:
                repeats += 1
            seen.add(gram)
    return repeats / total if total else None


# ---------------------------------------------------------------------------- models
class EvaluatedModel(Protocol):
    """What evaluation needs of a model: scoring windows and stepping a batch."""

    def score(self, windows: np.ndarray) -> torch.Tensor:
        """Summed `LOSS_KEYS` (float64) for int64 windows (B, T + 1)."""
        ...

    def zero_state(self, batch: int) -> State: ...

    def step(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, State]:
        """Feed tokens (B, T) from state (h, c); logits (B, V) after the last, new state."""
        ...


def loss_parts(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """training's `losses` for logits (B, T, V) and x, y (B, T), stacked as LOSS_KEYS."""
    parts = losses(logits, x, y)
    return torch.stack([parts[key].double() for key in LOSS_KEYS])


class TorchModel:
    """A checkpoint's RecipeLSTM on the CPU, scored in one pass as training validates."""

    def __init__(self, model: RecipeLSTM) -> None:
        self.model = model.eval()
        self.config = model.config

    @torch.no_grad()
    def score(self, windows: np.ndarray) -> torch.Tensor:
        batch = torch.from_numpy(windows)
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T) each
        logits, _ = self.model(x)  # (B, T, V)
        return loss_parts(logits, x, y)

    def zero_state(self, batch: int) -> State:
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    @torch.no_grad()
    def step(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, State]:
        state = (torch.from_numpy(h), torch.from_numpy(c))
        logits, (hn, cn) = self.model(torch.from_numpy(tokens), state)  # (B, T, V)
        return logits[:, -1].numpy(), (hn.numpy(), cn.numpy())


class GraphModel:
    """A bundle's ONNX graph in onnxruntime, opened as the service opens it and stepped
    one token at a time as the service steps it (logits for the last position only)."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self.session = open_session(bundle.model_path, intra_op_threads=0)

    def score(self, windows: np.ndarray) -> torch.Tensor:
        x, y = torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:])  # (B, T)
        h, c = self.zero_state(len(windows))
        totals = torch.zeros(len(LOSS_KEYS), dtype=torch.float64)
        for t in range(x.shape[1]):
            logits, (h, c) = self.step(windows[:, t : t + 1], h, c)  # (B, V)
            step_logits = torch.from_numpy(logits)[:, None]  # (B, 1, V)
            totals += loss_parts(step_logits, x[:, t : t + 1], y[:, t : t + 1])
        return totals

    def zero_state(self, batch: int) -> State:
        shape = (self.bundle.num_layers, batch, self.bundle.hidden_size)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def step(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, State]:
        feeds = {"tokens": np.ascontiguousarray(tokens), "h0": h, "c0": c}
        logits, hn, cn = self.session.run(["logits", "hn", "cn"], feeds)
        return logits, (hn, cn)


# ---------------------------------------------------------------------------- losses
@dataclass(frozen=True)
class Losses:
    loss: float  # word targets and the stop target: training's val_loss
    perplexity: float
    loss_words: float  # word targets only: training's val_loss_words
    perplexity_words: float
    loss_stop: float | None  # stop targets only; None when no text ends inside its window
    loss_unmasked: float  # every position, padding included: training's val_loss_unmasked
    word_targets: int
    stop_targets: int

    @classmethod
    def from_totals(cls, totals: torch.Tensor) -> Losses:
        """From summed LOSS_KEYS: "stop" counts words and stop targets, "pads" words only."""
        sums = dict(zip(LOSS_KEYS, totals.tolist(), strict=True))
        means = summarise(totals)
        stop_targets = round(sums["stop_n"] - sums["pads_n"])
        stop_sum = sums["stop_sum"] - sums["pads_sum"]
        return cls(
            loss=means["loss"],
            perplexity=math.exp(means["loss"]),
            loss_words=means["loss_words"],
            perplexity_words=math.exp(means["loss_words"]),
            loss_stop=stop_sum / stop_targets if stop_targets else None,
            loss_unmasked=sums["none_sum"] / max(1.0, sums["none_n"]),
            word_targets=round(sums["pads_n"]),
            stop_targets=stop_targets,
        )


def score_windows(model: EvaluatedModel, windows: np.ndarray, advance: Advance) -> Losses:
    """The losses over int64 windows (N, T + 1), LOSS_BATCH windows at a time."""
    totals = torch.zeros(len(LOSS_KEYS), dtype=torch.float64)
    for start in range(0, len(windows), LOSS_BATCH):
        batch = windows[start : start + LOSS_BATCH]
        totals += model.score(batch)
        advance(batch[:, :-1].size)
    if totals[LOSS_KEYS.index("pads_n")] == 0:
        raise ValueError("the texts have no word targets to score")
    return Losses.from_totals(totals)


# ---------------------------------------------------------------------------- samples
def draw_samples(
    model: EvaluatedModel,
    prompt: Sequence[int],
    count: int,
    max_tokens: int,
    temperature: float,
    generator: torch.Generator,
    advance: Advance,
) -> list[Sample]:
    """`count` samples in one batch: feed the prompt, then draw until the stop token or
    `max_tokens` draws, with training's temperature; rows leave the batch as they stop."""
    words: list[list[int]] = [[] for _ in range(count)]
    stopped = [False] * count
    active = np.arange(count)  # the rows still drawing
    tokens = np.tile(np.asarray(prompt, np.int64), (count, 1))  # (B, P)
    logits, (h, c) = model.step(tokens, *model.zero_state(count))  # (B, V)
    for drawn_so_far in range(1, max_tokens + 1):
        probs = apply_temperature(torch.from_numpy(logits), temperature)  # (A, V)
        drawn = torch.multinomial(probs, 1, generator=generator)[:, 0].numpy()  # (A,)
        advance(len(active))
        going = drawn != PAD_ID
        for row in active[~going].tolist():
            stopped[row] = True
        for row, token in zip(active[going].tolist(), drawn[going].tolist(), strict=True):
            words[row].append(token)
        active = active[going]
        if not len(active) or drawn_so_far == max_tokens:
            break
        logits, (h, c) = model.step(drawn[going][:, None], h[:, going], c[:, going])
    advance(sum(max_tokens - len(w) - s for w, s in zip(words, stopped, strict=True)))
    return [Sample(tuple(w), s) for w, s in zip(words, stopped, strict=True)]


@dataclass(frozen=True)
class SampleRun:
    """What the samples at one temperature show."""

    temperature: float
    samples: int
    stopped: int
    stop_share: float
    mean_words: float
    distinct_2: float | None
    repeat_rate: float | None
    examples: list[str]  # the first few samples, as text


def sample_run(
    model: EvaluatedModel,
    tokenizer: Tokenizer,
    temperature: float,
    options: SamplingOptions,
    advance: Advance,
) -> SampleRun:
    prompt = tokenizer.encode(SAMPLE_PROMPT)
    generator = torch.Generator().manual_seed(options.seed)
    samples = draw_samples(
        model, prompt, options.samples, options.max_tokens, temperature, generator, advance
    )
    sequences = [sample.words for sample in samples]
    return SampleRun(
        temperature=temperature,
        samples=len(samples),
        stopped=sum(sample.stopped for sample in samples),
        stop_share=stop_share(samples),
        mean_words=sum(map(len, sequences)) / len(samples),
        distinct_2=distinct_n(sequences, 2),
        repeat_rate=repeat_rate(sequences, REPEAT_WINDOW),
        examples=[SAMPLE_PROMPT + tokenizer.decode(seq, context=prompt) for seq in sequences[:3]],
    )


@dataclass(frozen=True)
class SamplingOptions:
    samples: int = DEFAULT_SAMPLES
    max_tokens: int = DEFAULT_MAX_TOKENS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1 or self.max_tokens < 1:
            raise ValueError("--samples and --max-tokens must be at least 1")
        if not -(2**63) <= self.seed < 2**64:  # what torch.Generator.manual_seed takes
            raise ValueError("--seed must fit in 64 bits")


# ---------------------------------------------------------------------------- data
@dataclass(frozen=True)
class SplitSettings:
    """The training run's settings that decide its texts, and where they came from."""

    config: TrainConfig  # only seed, val_fraction, seq_len and max_recipes are read
    source: str


@dataclass(frozen=True)
class DataRecord:
    path: str
    split: Split
    corpus_texts: int  # texts read (the first max_recipes)
    texts: int  # texts in the split
    seq_len: int  # windows are seq_len + 1 tokens
    seed: int
    val_fraction: float
    max_recipes: int | None
    settings_from: str
    split_verified: bool  # a tokenizer trained on the split's training texts is the model's


def split_windows(
    path: str | Path, tokenizer: Tokenizer, split: Split, settings: SplitSettings
) -> tuple[np.ndarray, DataRecord]:
    """The windows (N, seq_len + 1) of one split of the corpus, as training makes them."""
    config = settings.config
    texts = load_corpus(path, config.max_recipes)
    train_idx, val_idx = split_train_val(len(texts), config.val_fraction, config.seed)
    chosen = {"validation": val_idx, "train": train_idx, "all": np.arange(len(texts))}[split]
    if not len(chosen):
        raise ValueError(
            f"the {split} split of {path} is empty ({len(texts)} texts, "
            f"val_fraction {config.val_fraction})"
        )
    relearnt = Tokenizer.train((texts[i] for i in train_idx), tokenizer.vocab_size)
    record = DataRecord(
        path=str(path),
        split=split,
        corpus_texts=len(texts),
        texts=len(chosen),
        seq_len=config.seq_len,
        seed=config.seed,
        val_fraction=config.val_fraction,
        max_recipes=config.max_recipes,
        settings_from=settings.source,
        split_verified=relearnt.vocab == tokenizer.vocab,
    )
    return encode_windows([texts[i] for i in chosen], tokenizer, config.seq_len), record


def bundle_train_config(bundle: ModelBundle) -> tuple[dict[str, Any] | None, str]:
    """The train_config of the checkpoint the bundle was exported from, when that file is
    still where the manifest says with the sha256 it records."""
    source = bundle.manifest.get("source") or {}
    path = Path(str(source.get("checkpoint", "")))
    if not path.name or not path.is_file() or sha256_file(path) != source.get("checkpoint_sha256"):
        return None, "defaults (the bundle's source checkpoint is not here)"
    try:
        return dict(load_checkpoint(path)["train_config"]), f"the bundle's source checkpoint {path}"
    except CheckpointError:
        return None, "defaults (the bundle's source checkpoint cannot be read)"


def split_settings(
    train_config: dict[str, Any] | None, source: str, **overrides: Any
) -> SplitSettings:
    """TrainConfig from the run's train_config (else the defaults), with flag overrides."""
    try:
        config = TrainConfig.from_dict(train_config or {})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"unusable train_config from {source}: {exc}") from exc
    given = [name for name, value in overrides.items() if value is not None]
    if given:
        source += f", overridden: {', '.join(given)}"
    return SplitSettings(config.with_overrides(**overrides), source)


# ---------------------------------------------------------------------------- the report
@dataclass(frozen=True)
class ModelRecord:
    kind: Literal["bundle", "checkpoint"]
    path: str
    version: str | None  # the bundle's version; None for a checkpoint
    precision: str
    epoch: int | None


@dataclass(frozen=True)
class Report:
    model: ModelRecord
    data: DataRecord
    losses: Losses
    prompt: str
    max_tokens: int
    seed: int
    repeat_window: int
    sampling: dict[str, SampleRun]  # by temperature, as str(T)
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    model: EvaluatedModel,
    tokenizer: Tokenizer,
    record: ModelRecord,
    data: str | Path,
    settings: SplitSettings,
    split: Split = "validation",
    options: SamplingOptions | None = None,
) -> Report:
    """Score one split of `data`, then sample at both temperatures, under one progress bar."""
    from tqdm import tqdm

    options = options or SamplingOptions()
    started = time.perf_counter()
    windows, data_record = split_windows(data, tokenizer, split, settings)
    temperatures = (STOP_TEMPERATURE, REPEAT_TEMPERATURE)
    total = windows[:, :-1].size + len(temperatures) * options.samples * options.max_tokens
    with tqdm(total=total, unit="tok", file=sys.stderr, leave=False, disable=None) as bar:
        bar.set_description(f"{split} loss")
        scored = score_windows(model, windows, bar.update)
        runs = {}
        for temperature in temperatures:
            bar.set_description(f"samples T={temperature}")
            runs[str(temperature)] = sample_run(model, tokenizer, temperature, options, bar.update)
    return Report(
        model=record,
        data=data_record,
        losses=scored,
        prompt=SAMPLE_PROMPT,
        max_tokens=options.max_tokens,
        seed=options.seed,
        repeat_window=REPEAT_WINDOW,
        sampling=runs,
        seconds=time.perf_counter() - started,
    )


def summary(report: Report) -> str:
    """The report as a few readable lines."""

    def share(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    m, d, lo = report.model, report.data, report.losses
    what = ", ".join(
        part
        for part in (
            m.version and f"version {m.version}",
            m.precision,
            m.epoch is not None and f"epoch {m.epoch}",
        )
        if part
    )
    check = "verified" if d.split_verified else "NOT verified against the tokenizer"
    stop = "n/a   " if lo.loss_stop is None else f"{lo.loss_stop:.4f}"
    lines = [
        f"model     {m.kind} {m.path} ({what})",
        f"data      {d.path}: {d.split} split, {d.texts:,} of {d.corpus_texts:,} texts, "
        f"{d.seq_len + 1}-token windows",
        f"          seed {d.seed}, val_fraction {d.val_fraction}, max_recipes {d.max_recipes}; "
        f"settings from {d.settings_from}; split {check}",
        f"loss      {lo.loss:.4f} perplexity {lo.perplexity:.2f}  "
        f"(words and stop targets, as training's val_loss)",
        f"words     {lo.loss_words:.4f} perplexity {lo.perplexity_words:.2f}  "
        f"({lo.word_targets:,} word targets)",
        f"stop      {stop}  ({lo.stop_targets:,} of {d.texts:,} texts end inside their window)",
        f"samples   {report.sampling[str(STOP_TEMPERATURE)].samples} per temperature from "
        f"{report.prompt!r}, at most {report.max_tokens} tokens, seed {report.seed}",
    ]
    for key, run in report.sampling.items():
        lines.append(
            f"  T={key:<5} stopped {run.stop_share:.0%}, mean {run.mean_words:.1f} words, "
            f"distinct-2 {share(run.distinct_2)}, "
            f"repeat rate ({report.repeat_window}-word) {share(run.repeat_rate)}"
        )
    for key, run in report.sampling.items():
        if run.examples:
            lines.append(f"  e.g. T={key}: {shorten(run.examples[0], EXAMPLE_CHARS)}")
    lines.append(f"took {report.seconds:.1f}s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- loading
def open_bundle(path: str) -> tuple[GraphModel, Tokenizer, ModelRecord, ModelBundle]:
    bundle = load_bundle(path)
    source = bundle.manifest.get("source") or {}
    epoch = source.get("epoch")
    record = ModelRecord(
        "bundle",
        str(path),
        bundle.version,
        bundle.precision,
        epoch if isinstance(epoch, int) else None,
    )
    return GraphModel(bundle), bundle.tokenizer, record, bundle


def open_checkpoint(path: str) -> tuple[TorchModel, Tokenizer, ModelRecord, dict[str, Any]]:
    file = resolve(path)
    model, payload = load_model(file)
    tokenizer = load_tokenizer(file, payload)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} words but the model {model.config.vocab_size}"
        )
    record = ModelRecord("checkpoint", str(file), None, "fp32", int(payload["epoch"]))
    return TorchModel(model), tokenizer, record, payload


# ---------------------------------------------------------------------------- the command
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m training.evaluate", description=(__doc__ or "").splitlines()[0]
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--bundle", help="a bundle folder: its ONNX graph on onnxruntime")
    which.add_argument("--checkpoint", help="a training folder (best.pt) or .pt: torch")
    parser.add_argument("--data", required=True, help="the corpus: any format training reads")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument(
        "--split", choices=SPLITS, default="validation", help="texts to score (default validation)"
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=DEFAULT_SAMPLES,
        help=f"samples per temperature (default {DEFAULT_SAMPLES})",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"draws per sample (default {DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")
    parser.add_argument("--split-seed", type=int, help="override the run's split seed")
    parser.add_argument("--val-fraction", type=float, help="override the run's val_fraction")
    parser.add_argument("--seq-len", type=int, help="override the run's window length")
    parser.add_argument("--max-recipes", type=int, help="override the run's max_recipes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model: EvaluatedModel
    try:
        options = SamplingOptions(args.samples, args.max_tokens, args.seed)
        if args.bundle is not None:
            model, tokenizer, record, bundle = open_bundle(args.bundle)
            train_config, source = bundle_train_config(bundle)
        else:
            model, tokenizer, record, payload = open_checkpoint(args.checkpoint)
            train_config, source = payload["train_config"], f"the checkpoint {record.path}"
        settings = split_settings(
            train_config,
            source,
            seed=args.split_seed,
            val_fraction=args.val_fraction,
            seq_len=args.seq_len,
            max_recipes=args.max_recipes,
        )
        report = evaluate(model, tokenizer, record, args.data, settings, args.split, options)
        if args.json is not None:
            atomic_write_json(args.json, report.to_dict())
    except (ValueError, OSError) as exc:  # CorpusError, CheckpointError, BundleError: one line
        return fail(" ".join(str(exc).split()))
    if not report.data.split_verified:
        print(
            "warning: a tokenizer trained on this split's training texts is not the model's: "
            "these may not be the texts the run held out (see --split-seed, --val-fraction, "
            "--max-recipes)",
            file=sys.stderr,
        )
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
