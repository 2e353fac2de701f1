"""benchmarks/grad_precision.py at a tiny size: its rows, and exact within 2x the naive error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_grad_precision_benchmark_rows(tmp_path):
    out = tmp_path / "rows.jsonl"
    args = "--world 2 --seq 64 --heads 2 --head-dim 16 --seeds 1 --out".split()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "grad_precision.py"), *args, str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["grad_precision"] for r in rows] == ["exact", "fast"]
    for r in rows:
        for n in ("out", "dq", "dk", "dv"):
            assert 0 < r[f"naive_{n}"] < 0.1
            assert r[f"x_naive_{n}"] == r[f"err_{n}"] / r[f"naive_{n}"]
    assert all(rows[0][f"x_naive_{n}"] <= 2.0 for n in ("out", "dq", "dk", "dv"))
    assert "| 2 | exact |" in done.stdout
