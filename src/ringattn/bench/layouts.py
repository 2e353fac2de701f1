"""``ringattn bench layouts``: causal load balance of contiguous, zigzag and striped.

Same global causal problem, one launch of W ranks for all three layouts. Per rank: the
attention FLOPs the schedule assigns (``ringattn.schedule.attention_flops``, fwd + bwd) and
the rank's measured fwd+bwd CPU time. The slowest rank sets the pace of a ring, so the
numbers to read are ``max/min`` and ``max / mean``: the fraction of the machine a layout
wastes waiting for its busiest rank.
"""

from __future__ import annotations

import argparse

from .attention import measure
from .common import (
    add_output_args,
    cores,
    machine,
    machine_line,
    markdown_table,
    problem,
    pyplot,
    report,
    save,
)

LAYOUTS = ("contiguous", "zigzag", "striped")


def balance(values: list[float]) -> dict:
    """max/min and max/mean of per-rank values (inf when a rank has none)."""
    lo, hi, mean = min(values), max(values), sum(values) / len(values)
    return dict(max_over_min=hi / lo if lo > 0 else float("inf"), max_over_mean=hi / mean)


def layout_rows(results: list[dict]) -> list[dict]:
    out = []
    for r in results:
        f = balance(r["flops_fwdbwd_per_rank"])
        t = balance(r["fwdbwd_cpu_per_rank"])
        out.append(
            dict(
                r,
                flops_max_over_min=f["max_over_min"],
                flops_max_over_mean=f["max_over_mean"],
                time_max_over_min=t["max_over_min"],
                time_max_over_mean=t["max_over_mean"],
            )
        )
    return out


def _per_rank(key: str, scale: float, fmt: str):
    return lambda r: " ".join(fmt.format(x / scale) for x in r[key])


COLUMNS = [
    ("layout", "layout", "{}"),
    ("flops_fwdbwd_per_rank", "GFLOP per rank", _per_rank("flops_fwdbwd_per_rank", 1e9, "{:.1f}")),
    ("flops_max_over_min", "FLOPs max/min", "{:.2f}"),
    ("fwdbwd_cpu_per_rank", "CPU s per rank", _per_rank("fwdbwd_cpu_per_rank", 1, "{:.3f}")),
    ("time_max_over_min", "time max/min", "{:.2f}"),
    ("time_max_over_mean", "time max/mean", "{:.2f}"),
    ("fwdbwd_s", "f+b wall s", "{:.3f}"),
    ("tflops_fwdbwd_per_rank", "TF/s/rank (min)", "{:.3f}"),
]

NOTES = (
    "W = {w}, causal, global seq {seq}, {dtype}, {h} heads x {d}; fwd+bwd. FLOPs from the "
    "schedule (masked blocks are skipped, not computed); CPU s per rank: that rank's own CPU "
    "time (compute + gloo threads), in rank order; max/mean = the busiest rank over the "
    "average: 1.00 means no rank waits. Wall: {w} ranks share {cores} cores."
)


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=False)
    w = rows[0]["world"]
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [x + (i - (len(rows) - 1) / 2) * width for x in range(w)]
        axes[0].bar(xs, [f / 1e9 for f in r["flops_fwdbwd_per_rank"]], width, label=r["layout"])
        axes[1].bar(xs, r["fwdbwd_cpu_per_rank"], width, label=r["layout"])
    axes[0].set_ylabel("GFLOP (fwd+bwd, from the schedule)")
    axes[1].set_ylabel("CPU seconds (fwd+bwd, measured)")
    for ax in axes:
        ax.set_xticks(range(w), [f"rank {r}" for r in range(w)])
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(
        f"causal load balance, W={w}, seq={r0['seq']}, {r0['dtype']}, "
        f"{r0['heads']} heads x {r0['head_dim']}",
        fontsize=10,
    )
    save(fig, path, machine_line(r0.get("machine")))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ringattn bench layouts", description=__doc__)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--layout", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--kernel", default="auto")
    p.add_argument("--repeats", type=int, default=1)
    add_output_args(p, "layouts")
    args = p.parse_args(argv)
    probs = [
        problem(
            world=args.world,
            seq=args.seq,
            layout=lay,
            causal=True,
            dtype=args.dtype,
            heads=args.heads,
            head_dim=args.head_dim,
            kernel=args.kernel,
        )
        for lay in args.layout
    ]
    m = machine()
    rows = [
        dict(r, bench="layouts", machine=m)
        for r in layout_rows(measure(probs, args.repeats, reference=False))
    ]
    notes = NOTES.format(
        w=args.world, seq=args.seq, dtype=args.dtype, h=args.heads, d=args.head_dim, cores=cores()
    )
    report(rows, markdown_table(rows, COLUMNS), args, notes)
    if args.png:
        plot(rows, args.png)
    return 0
