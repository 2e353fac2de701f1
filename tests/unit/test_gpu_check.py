"""``make gpu-check`` / ``ringattn check --device cuda``: the clean skip without CUDA, and the
same three parts run for real on CPU gloo ranks at a tiny size (only the sizes differ)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from tests.cli_errors import ROOT, run_cli


def test_without_cuda_it_prints_one_line_and_exits_0(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the check would run")
    rc, out, err = run_cli(["check", "--device", "cuda"], tmp_path)
    assert rc == 0, err
    assert err.strip() == ""
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check skipped: no CUDA device"), out


def test_make_target_runs_the_cuda_check():
    dry = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "gpu-check", "STAMP=Makefile"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "ringattn.cli check --device cuda" in dry


@pytest.mark.slow
def test_cpu_run_of_the_whole_check(tmp_path):
    rc, out, err = run_cli(["check", "--device=cpu", "--world=2"], tmp_path, 400)
    assert rc == 0, out + err
    rows = [ln for ln in out.splitlines() if ln.startswith(("oracle", "timing", "trainer"))]
    assert len(rows) == 3 * 3 * 2 * 2 + 2  # strategies x dtypes x masks x head_dims + 2
    assert all(" OK " in r for r in rows), out
    assert "38/38 OK" in out
    trainer = next(r for r in rows if r.startswith("trainer"))
    assert "tiny cp=2" in trainer and "losses" in trainer
