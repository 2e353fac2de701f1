"""``ringattn bench layouts``: causal load balance of contiguous, zigzag and striped: per rank,
the schedule's fwd+bwd FLOPs and the measured CPU time, one launch of W ranks for all three.
The slowest rank sets the pace: read max/min and max/mean. See docs/benchmarks.md.
"""

from __future__ import annotations

from ..schedule import balance
from . import harness as h
from . import output
from .attention import measure


def layout_rows(results: list[dict]) -> list[dict]:
    """Each row with ``{flops,time}_max_over_{min,mean}``."""
    per = dict(flops="flops_fwdbwd_per_rank", time="fwdbwd_cpu_per_rank")
    bal = lambda r: {f"{n}_{k}": v for n, key in per.items() for k, v in balance(r[key]).items()}
    return [dict(r, **bal(r)) for r in results]


COLUMNS = output.columns(
    "layout=layout; flops_fwdbwd_per_rank=GFLOP per rank:.1f/1e9; "
    "flops_max_over_min=FLOPs max/min:.2f; fwdbwd_cpu_per_rank=CPU s per rank:.3f; "
    "time_max_over_min=time max/min:.2f; time_max_over_mean=time max/mean:.2f; "
    "fwdbwd_s=f+b wall s:.3f; tflops_fwdbwd_per_rank=TF/s/rank (min):.3f",
)

NOTES = (
    "W = {world} ranks on {cores} cores, causal, global seq {seq}, {dtype}, {heads} heads x "
    "{head_dim}, fwd+bwd. Columns: docs/benchmarks.md#causal-layouts."
)


def plot(rows: list[dict], path: str) -> None:
    fig, axes = output.figure(2, figsize=(10, 3.8))
    w = rows[0]["world"]
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [x + (i - (len(rows) - 1) / 2) * width for x in range(w)]
        axes[0].bar(xs, [f / 1e9 for f in r["flops_fwdbwd_per_rank"]], width, label=r["layout"])
        axes[1].bar(xs, r["fwdbwd_cpu_per_rank"], width, label=r["layout"])
    ylabels = ("GFLOP (fwd+bwd, from the schedule)", "CPU seconds (fwd+bwd, measured)")
    for ax, y in zip(axes, ylabels):
        ax.set_xticks(range(w), [f"rank {r}" for r in range(w)])
        output.style(ax, "", y)
    r0 = rows[0]
    output.save(fig, path, rows, f"causal load balance, W={w}, seq={r0['seq']}, {r0['dtype']}, "
                f"{r0['heads']} heads x {r0['head_dim']}")  # fmt: skip


def main(argv: list[str]) -> int:
    p = h.parser("bench layouts", __doc__, out="layouts", repeats=1)
    h.problem_args(p, world=4, seq=8192, many=("layout",), extra=("kernel",))
    probs = lambda a: [h.problem_of(a, world=a.world, seq=a.seq, layout=lay) for lay in a.layout]
    args = h.parse(p, argv, probs)
    rows = layout_rows(measure(args.problems, args.repeats, reference=False))
    return output.report(output.stamp(rows, "layouts"), args, [COLUMNS], NOTES, plot)
