"""`python -m bench --smoke` runs every part of the benchmark and writes well-formed output."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _strict_json(text: str) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"not standard JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_smoke_run_writes_json_chart_and_summary(tmp_path: Path, redis_url: str) -> None:
    out = tmp_path / "results" / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--out",
            str(out),
            "--cache",
            str(tmp_path),
            "--redis-url",
            redis_url,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = _strict_json(out.read_text())

    assert {row["batch"] for row in result["engine"]["table"]} == set(result["config"]["batches"])
    for name, run in result["server"].items():
        assert run["tokens"] > 0, name
        assert run["errors"] == 0, name
        assert run["ttft_ms"]["p50"] > 0, name
    assert result["book"]["tokens"] > 0
    assert result["history"]["ratio"] > 0
    assert result["sessions"]["memory"]["sessions"] == result["config"]["sessions"]
    assert result["sessions"]["redis"]["sessions"] == result["config"]["sessions"]
    assert result["sessions"]["redis"]["keys_deleted"] == result["config"]["sessions"] + 1
    ratios = {r["name"]: r for r in result["ratios"]}
    assert len(ratios) == 10
    for item in ratios.values():
        assert isinstance(item["value"], float), item
        assert math.isfinite(item["value"]), item
        assert item["met"] in (True, False, None)

    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ratios" in proc.stdout
    assert str(out) in proc.stdout
