"""The soak harness at smoke size: concurrent streams with zero errors, bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_soak_smoke_has_no_errors_and_flat_memory(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.soak",
            "--bundle",
            str(tiny_bundle),
            "--streams",
            "32",
            "--seconds",
            "8",
            "--warmup",
            "3",
            "--tokens",
            "32",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    report = json.loads(out.read_text())
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["errors"] == 0, report["error_samples"]
    assert report["generations"] >= 32
    assert report["tokens"] == 32 * report["generations"]  # ignore_eos: every turn is full length
    assert len(report["rss_samples_mb"]) >= 6
    assert report["rss_growth"] <= 0.10
    assert report["load_after"]["generations"] == 0
    assert report["load_after"]["websockets"] == 0
