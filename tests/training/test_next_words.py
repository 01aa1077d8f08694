"""Next-word inspection (the book's Figure 5-10) and the book's temperature rule."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from training.next_words import main
from training.sampling import apply_temperature


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.2, 2.0])
def test_temperature_is_the_books_power_rule(temperature: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(50) * 3
    p = torch.softmax(logits, dim=-1)
    book = p ** (1 / temperature) / (p ** (1 / temperature)).sum()
    torch.testing.assert_close(apply_temperature(logits, temperature), book)


def test_prints_top_k_words_sharpening_as_temperature_falls(
    tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--checkpoint", str(tiny_run), "--prompt", "recipe for", "--top-k", "5"]
    assert main([*args, "--temperatures", "1.0", "0.2"]) == 0
    out = capsys.readouterr().out
    sections = re.split(r"\ntemperature ", out)[1:]
    assert [s.split(":")[0] for s in sections] == ["1.0", "0.2"]
    tables = [[float(v) for v in re.findall(r"(\d+\.\d+)%", s)] for s in sections]
    for table in tables:
        assert len(table) == 5
        assert table == sorted(table, reverse=True)
        assert sum(table) <= 100.0 + 1e-6
    assert tables[1][0] > tables[0][0]


def test_missing_checkpoint_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--checkpoint", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: checkpoint not found")
