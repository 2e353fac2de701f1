"""The output schema of every ``ringattn bench`` command at a tiny size: the JSON field names
of its rows and the header of each markdown table it prints.

``tests/unit/bench_outputs.json`` holds the schema recorded before the benchmarks were moved
onto one harness; ``test_bench.py`` asserts each command still produces exactly that.
Regenerate (only when an output is meant to change): ``python -m tests.unit.bench_outputs``.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).with_name("bench_outputs.json")
SMALL = ["--heads", "2", "--head-dim", "8"]

# command -> tiny arguments (no --out: added by ``schema``)
TINY: dict[str, list[str]] = {
    "attention": ["--world", "1", "2", "--seq", "64", *SMALL, "--causal", "both"],
    "scaling": ["--world", "2", "--seq", "64", *SMALL],
    "weak": ["--world", "1", "2", "--seq-per-rank", "32", *SMALL],
    "memory": ["--world", "1", "2", "--seq", "64", "128", *SMALL, "--plan-model", "tiny"]
    + ["--plan-world", "2", "4"],
    "layouts": ["--world", "2", "--seq", "64", *SMALL],
    "peers": ["--world", "2", "--seq", "256", "--heads", "2", "--head-dim", "16", "--repeats", "1"],
    "calibrate": ["--world", "2", "--seq", "64", *SMALL, "--repeats", "1", "--link-repeats", "1"],
    "train": ["--cp", "1", "--seq", "64", "--steps", "2", "--warmup", "1"],
    "packed": ["--world", "2", "--seq", "256", "--seeds", "1", "--time-seq", "64"]
    + ["--time-world", "2", "--repeats", "1", "--ring"],
}


def _keys(rows: list[dict]) -> list[list[str]]:
    """Distinct sorted key lists in first-seen order (nested dicts as ``key.sub``)."""
    out: list[list[str]] = []
    for r in rows:
        keys = sorted(
            f"{k}.{s}" if isinstance(v, dict) else k
            for k, v in r.items()
            for s in (v if isinstance(v, dict) else [None])
        )
        if keys not in out:
            out.append(keys)
    return out


def _headers(text: str) -> list[str]:
    """Header lines of the markdown tables in ``text`` (the line above each ``|---|``)."""
    lines = text.splitlines()
    return [lines[i - 1] for i, ln in enumerate(lines) if ln.startswith("|---") and i > 0]


def schema(name: str, tmp: Path) -> dict:
    """Run ``ringattn bench NAME`` (or ``check``) tiny in this process; fields and tables."""
    from ringattn.cli import main

    out = tmp / f"{name}.jsonl"
    argv = ["bench", name, *TINY[name], "--out", str(out)]
    if name == "train":
        argv += ["--dir", str(tmp / "train")]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return dict(fields=_keys(rows), tables=_headers(text.getvalue()))


def check_schema(tmp: Path) -> dict:
    """``ringattn check --json`` at a tiny size: the summary's fields."""
    from ringattn.cli import main

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        main(["check", "--world", "2", "--seq", "64", *SMALL, "--json"])
    summary = json.loads(text.getvalue().splitlines()[-1])
    return dict(fields=_keys([summary]), tables=[])


def record() -> dict:
    with tempfile.TemporaryDirectory() as d:
        got = {name: schema(name, Path(d)) for name in TINY}
        got["check"] = check_schema(Path(d))
    return got


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(record(), indent=1) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
