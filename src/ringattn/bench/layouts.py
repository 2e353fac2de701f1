"""``ringattn bench layouts``: causal load balance of contiguous, zigzag and striped.

Same global causal problem, one launch of W ranks for all three layouts. Per rank: the
attention FLOPs the schedule assigns (``ringattn.schedule.attention_flops``, fwd + bwd) and
the rank's measured fwd+bwd CPU time. The slowest rank sets the pace of a ring, so the
numbers to read are ``max/min`` and ``max / mean``: the fraction of the machine a layout
wastes waiting for its busiest rank.
"""

from __future__ import annotations

from . import harness as h
from . import output
from .attention import measure


def balance(values: list[float]) -> dict:
    """max/min and max/mean of per-rank values (inf when a rank has none)."""
    lo, hi, mean = min(values), max(values), sum(values) / len(values)
    return dict(max_over_min=hi / lo if lo > 0 else float("inf"), max_over_mean=hi / mean)


def layout_rows(results: list[dict]) -> list[dict]:
    out = []
    for r in results:
        f = balance(r["flops_fwdbwd_per_rank"])
        t = balance(r["fwdbwd_cpu_per_rank"])
        out.append(dict(r, flops_max_over_min=f["max_over_min"],
                        flops_max_over_mean=f["max_over_mean"],
                        time_max_over_min=t["max_over_min"],
                        time_max_over_mean=t["max_over_mean"]))  # fmt: skip
    return out


def _per_rank(key: str, scale: float, fmt: str):
    return lambda r: " ".join(fmt.format(x / scale) for x in r[key])


COLUMNS = output.columns(
    "layout=layout; flops_fwdbwd_per_rank=GFLOP per rank; "
    "flops_max_over_min=FLOPs max/min:.2f; fwdbwd_cpu_per_rank=CPU s per rank; "
    "time_max_over_min=time max/min:.2f; time_max_over_mean=time max/mean:.2f; "
    "fwdbwd_s=f+b wall s:.3f; tflops_fwdbwd_per_rank=TF/s/rank (min):.3f",
    flops_fwdbwd_per_rank=_per_rank("flops_fwdbwd_per_rank", 1e9, "{:.1f}"),
    fwdbwd_cpu_per_rank=_per_rank("fwdbwd_cpu_per_rank", 1, "{:.3f}"),
)

NOTES = (
    "W = {world}, causal, global seq {seq}, {dtype}, {heads} heads x {head_dim}; fwd+bwd. FLOPs "
    "from the schedule (masked blocks are skipped, not computed); CPU s per rank: that rank's "
    "own CPU time (compute + gloo threads), in rank order; max/mean = the busiest rank over "
    "the average: 1.00 means no rank waits. Wall: {world} ranks share {cores} cores."
)


def plot(rows: list[dict], path: str) -> None:
    fig, axes = output.figure(2, figsize=(10, 3.8))
    w = rows[0]["world"]
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [x + (i - (len(rows) - 1) / 2) * width for x in range(w)]
        axes[0].bar(xs, [f / 1e9 for f in r["flops_fwdbwd_per_rank"]], width, label=r["layout"])
        axes[1].bar(xs, r["fwdbwd_cpu_per_rank"], width, label=r["layout"])
    for ax, y in zip(
        axes, ("GFLOP (fwd+bwd, from the schedule)", "CPU seconds (fwd+bwd, measured)")
    ):
        ax.set_xticks(range(w), [f"rank {r}" for r in range(w)])
        output.style(ax, "", y)
    r0 = rows[0]
    fig.suptitle(f"causal load balance, W={w}, seq={r0['seq']}, {r0['dtype']}, "
                 f"{r0['heads']} heads x {r0['head_dim']}", fontsize=10)  # fmt: skip
    output.save(fig, path, output.machine_line(r0.get("machine")))


def main(argv: list[str]) -> int:
    p = h.parser("bench layouts", __doc__)
    h.problem_args(p, world=4, seq=8192, many=("layout",), extra=("kernel",))
    p.add_argument("--repeats", type=h.positive, default=1, help="timed runs after a warm-up")
    output.add_output_args(p, "layouts")
    args = p.parse_args(argv)
    probs = [h.problem_of(args, world=args.world, seq=args.seq, layout=lay) for lay in args.layout]
    h.check_problems(p, probs)
    rows = output.stamp(layout_rows(measure(probs, args.repeats, reference=False)), "layouts")
    notes = NOTES.format(**vars(args), cores=output.cores())
    return output.report(rows, output.markdown_table(rows, COLUMNS), args, notes, plot)
