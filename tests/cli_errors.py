"""Shared check for bad command-line input: run ``python -m ringattn.cli ARGS`` in a fresh
process and assert that it fails the way a user should see it fail.

A clean failure: exit code non-zero, no traceback, the error is ONE readable line on stderr
naming the option (``must_contain``), it comes back within ``timeout_s`` (before any rank
would have trained), and nothing is written under ``run_dir``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str], cwd: Path | str, timeout_s: float = 60.0):
    """(returncode, stdout, stderr) of ``python -m ringattn.cli *argv`` run in ``cwd``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    p = subprocess.run(
        [sys.executable, "-m", "ringattn.cli", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    return p.returncode, p.stdout, p.stderr


def assert_clean_error(
    argv: list[str], must_contain: str, cwd: Path | str, run_dir: Path | str | None = None
) -> str:
    """Assert a clean one-line failure; returns the error line."""
    rc, out, err = run_cli(argv, cwd)
    assert rc != 0, f"{argv}: exit code 0\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in out + err, f"{argv}: traceback\n{err}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"{argv}: expected one line on stderr, got {len(lines)}:\n{err}"
    assert must_contain in lines[0], f"{argv}: {must_contain!r} not in {lines[0]!r}"
    if run_dir is not None:
        run_dir = Path(run_dir)
        assert not run_dir.exists() or not any(run_dir.iterdir()), f"{argv}: wrote {run_dir}"
    return lines[0]
