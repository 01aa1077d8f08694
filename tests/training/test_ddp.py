"""Data-parallel training: torchrun, two CPU processes on gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.checkpoint import load_checkpoint
from training.data import load_corpus
from training.presets import get_preset
from training.train import train

ROOT = Path(__file__).resolve().parents[2]
# 160 texts: 144 train = 9 global batches of 2 x 8, so no process gets padded samples.
RECIPES, PER_PROCESS_BATCH = 160, 8


@pytest.mark.slow
def test_two_gloo_processes_step_like_one_process_with_their_joint_batch(
    tmp_path: Path, epicurious_path: Path
) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "training", "--data", str(epicurious_path), "--out", str(out),
            "--preset", "tiny", "--epochs", "1", "--max-recipes", str(RECIPES),
            "--batch-size", str(PER_PROCESS_BATCH), "--device", "cpu",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stderr
    assert result.stderr.count("epoch 1/1:") == 1  # only rank 0 logs
    metrics = json.loads((out / "metrics.json").read_text())["epochs"]
    assert metrics[0]["world_size"] == 2
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files

    config = get_preset("tiny").with_overrides(
        epochs=1, max_recipes=RECIPES, batch_size=2 * PER_PROCESS_BATCH
    )
    single = train(load_corpus(epicurious_path, RECIPES), config, tmp_path / "single")
    ddp_state = load_checkpoint(out / "checkpoint.pt")["model_state"]
    single_state = load_checkpoint(tmp_path / "single" / "checkpoint.pt")["model_state"]
    for name, tensor in single_state.items():
        torch.testing.assert_close(ddp_state[name], tensor, atol=2e-5, rtol=1e-4)
    assert metrics[0]["val_loss"] == pytest.approx(single.history[0]["val_loss"], rel=1e-4)
