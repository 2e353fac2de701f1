"""Redraw a ``ringattn bench <kind>`` plot from its JSON lines (the commands draw the same
plot themselves with ``--png``; this is for rows collected earlier or on another machine).

    python benchmarks/plot_bench.py scaling runs/bench/scaling.jsonl --png docs/img/scaling.png

Rows of other kinds in the file are ignored; with several runs appended to one file, only
the last run's rows (same ``machine`` stamp) are drawn.
"""

from __future__ import annotations

import argparse

from ringattn.bench import calibrate, layouts, memory, peers, scaling
from ringattn.bench.output import read_rows

PLOTS = {
    "scaling": scaling.plot_strong,
    "weak": scaling.plot_weak,
    "memory": memory.plot,
    "layouts": layouts.plot,
    "peers": peers.plot,
    "calibrate": calibrate.plot,
}


def last_run(rows: list[dict], kind: str) -> list[dict]:
    """The rows of ``kind`` written by the most recent run (runs differ in their stamp)."""
    mine = [r for r in rows if r.get("bench") == kind]
    if not mine:
        return []
    stamp = mine[-1].get("machine")
    tail = []
    for r in reversed(mine):
        if r.get("machine") != stamp:
            break
        tail.append(r)
    return tail[::-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("kind", choices=sorted(PLOTS))
    p.add_argument("jsonl")
    p.add_argument("--png", required=True)
    a = p.parse_args()
    rows = last_run(read_rows(a.jsonl), a.kind)
    if not rows:
        raise SystemExit(f"no '{a.kind}' rows in {a.jsonl}")
    PLOTS[a.kind](rows, a.png)


if __name__ == "__main__":
    main()
