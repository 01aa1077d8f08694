"""Sampling from the model: whole recipes, or the distribution of the next word.

Temperature follows the book: the probabilities p are raised to 1/T and normalised,
which is softmax(logits / T). Generation is stateful: the prompt is fed once and then
one token at a time with the LSTM state carried over, as the service does.
"""

from __future__ import annotations

import torch

from simmer.tokenizer import PAD_ID, Tokenizer
from training.model import RecipeLSTM


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probabilities over the last axis: softmax(logits / T) = p^(1/T) / sum(p^(1/T))."""
    return torch.softmax(logits.float() / temperature, dim=-1)


@torch.no_grad()
def next_word_probabilities(
    model: RecipeLSTM, tokenizer: Tokenizer, prompt: str, temperature: float = 1.0
) -> torch.Tensor:
    """(V,) probabilities of the word after `prompt`."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt has no words")
    device = next(model.parameters()).device
    logits, _ = model(torch.tensor([ids], device=device))  # (1, T, V)
    return apply_temperature(logits[0, -1], temperature).cpu()


def top_next_words(
    model: RecipeLSTM, tokenizer: Tokenizer, prompt: str, temperature: float, k: int
) -> list[tuple[str, float]]:
    """The k most likely next words with their probabilities, most likely first."""
    probs = next_word_probabilities(model, tokenizer, prompt, temperature)
    top = torch.topk(probs, min(k, probs.numel()))
    return [
        (tokenizer.id_to_word(int(i)), float(p))
        for p, i in zip(top.values, top.indices, strict=True)
    ]


@torch.no_grad()
def generate(
    model: RecipeLSTM,
    tokenizer: Tokenizer,
    prompt: str,
    max_tokens: int,
    temperature: float,
    generator: torch.Generator,
) -> str:
    """The book's TextGenerator callback: sample until the stop token or `max_tokens`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt)
    logits, state = model(torch.tensor([ids], device=device))  # (1, T, V)
    out: list[int] = []
    for _ in range(max_tokens):
        probs = apply_temperature(logits[0, -1], temperature).cpu()  # (V,)
        token = int(torch.multinomial(probs, 1, generator=generator))
        if token == PAD_ID:
            break
        out.append(token)
        logits, state = model(torch.tensor([[token]], device=device), state)
    model.train(was_training)
    return prompt + tokenizer.decode(out, context=ids)
