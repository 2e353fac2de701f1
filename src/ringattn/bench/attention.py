"""``ringattn bench attention``: ring (or another strategy) on W local gloo ranks against
single-process SDPA on the same global problem, measured in the same run: times, TFLOP/s
per rank, communication wait and bytes, peak RSS; ``cpu_ratio`` = ring CPU / SDPA CPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from ..comm import count_comm
from ..cp import STRATEGIES, context_parallel_attention
from ..memstat import peak_rss_mib
from ..ring import ring_attention
from ..schedule import attention_flops
from . import harness as h
from . import output

# what the single-process SDPA reference depends on
GLOBAL_PROBLEM = ("seq", "causal", "dtype", "batch", "heads", "kv_heads", "head_dim")


def _attend(row: dict, world: int):
    """The strategy's call for this row, with its keyword arguments."""
    kw = dict(causal=row["causal"], layout=row["layout"], kernel=row["kernel"])
    if row["strategy"] == "hybrid":
        from torch.distributed.device_mesh import init_device_mesh

        u = row.get("ulysses", 2)
        kw["mesh"] = init_device_mesh("cpu", (world // u, u), mesh_dim_names=("ring", "ulysses"))
    if row["strategy"] == "ring":
        return lambda q, k, v: ring_attention(q, k, v, **kw)
    return lambda q, k, v: context_parallel_attention(q, k, v, strategy=row["strategy"], **kw)


def _time_row(row: dict, rank: int, world: int, repeats: int) -> dict:
    """This rank's best repeat (least fwd+bwd wall time) of one row, after one warm-up (gloo
    connects pairs lazily); a barrier lines the ranks up before each clock."""
    q, k, v, do = h.local_inputs(row, rank, world)
    attn = _attend(row, world)

    def run() -> dict:
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        m: dict = {}
        h.barrier()
        with torch.no_grad(), count_comm() as c_fwd, h.clock(m, "fwd"):
            attn(q, k, v)
        h.barrier()
        with count_comm() as c_all, h.clock(m, "fwdbwd"):
            attn(ql, kl, vl).backward(do)
        return dict(m, wait_fwd_s=c_fwd.wait_s, wait_fwdbwd_s=c_all.wait_s,
                    bytes_fwd=c_fwd.total_bytes, bytes_fwdbwd=c_all.total_bytes)  # fmt: skip

    return dict(h.timed(run, repeats, key="fwdbwd_s")[0], peak_rss_mb=peak_rss_mib())


def time_rows(rank: int, world: int, rows: list[dict], repeats: int) -> list[dict]:
    """Every rank of a launch (or the parent for W = 1): each row timed on this rank."""
    return [_time_row(row, rank, world, repeats) for row in rows]


def measure(rows: list[dict], repeats=1, threads=1, reference=True) -> Iterator[dict]:
    """Run ``rows`` (any mix of world sizes): one launch of W local gloo ranks per W (W = 1
    runs here, without a process group), plus the single-process SDPA reference of each
    global problem, timed once per problem in this process. Yields summarized rows in
    launch order, each as soon as it is ready."""
    torch.set_num_threads(threads)
    refs: dict = {}  # the global problem -> its SDPA timings, so sweeps over W time it once
    for w in sorted({r["world"] for r in rows}):
        mine = [r for r in rows if r["world"] == w]
        ranks = h.run_ranks(time_rows, w, mine, repeats, threads=threads)
        for i, row in enumerate(mine):
            key = tuple(row[k] for k in GLOBAL_PROBLEM)
            if reference and key not in refs:
                refs[key] = h.sdpa_reference(row, repeats)
            yield summarize(row, [r[i] for r in ranks], refs.get(key))


def summarize(row: dict, ranks: list[dict], ref: dict | None) -> dict:
    shape = dict(batch=row["batch"], heads=row["heads"], head_dim=row["head_dim"])
    args = (row["layout"], row["world"], row["seq"], row["causal"])
    flops = attention_flops(*args, **shape)
    fb_flops = [f + b for f, b in zip(flops, attention_flops(*args, **shape, backward=True))]
    per = {k: [r[k] for r in ranks] for k in ranks[0]}  # measurement -> per rank, rank order
    # wall times, waits, bytes and RSS: the slowest rank's; CPU time: the sum over ranks
    res = dict(
        row,
        **{k: max(per[k]) for k in ("fwd_s", "fwdbwd_s", "wait_fwd_s", "wait_fwdbwd_s")},
        **{k: sum(per[k]) for k in ("fwd_cpu_s", "fwdbwd_cpu_s")},
        **{f"bytes_sent_{k}": max(per[f"bytes_{k}"]) for k in ("fwd", "fwdbwd")},
        peak_rss_mb=max(per["peak_rss_mb"]),
        flops_fwd_max_over_min=max(flops) / max(min(flops), 1),
        # achieved per rank = that rank's scheduled FLOPs / its own time (CPU time: with more
        # ranks than cores, wall time includes waiting for a core)
        tflops_fwd_per_rank=min(f / t for f, t in zip(flops, per["fwd_cpu_s"])) / 1e12,
        tflops_fwdbwd_per_rank=min(f / t for f, t in zip(fb_flops, per["fwdbwd_cpu_s"])) / 1e12,
        # per rank, in rank order: what scaling and layout tables are made of
        fwd_cpu_per_rank=per["fwd_cpu_s"],
        fwdbwd_cpu_per_rank=per["fwdbwd_cpu_s"],
        fwdbwd_wall_per_rank=per["fwdbwd_s"],
        fwdbwd_cpu_max_s=max(per["fwdbwd_cpu_s"]),
        flops_fwdbwd_per_rank=fb_flops,
    )
    if ref is not None:
        res.update({f"sdpa_{k}": v for k, v in ref.items()})
        res.update(
            {f"cpu_ratio_{k}": res[f"{k}_cpu_s"] / ref[f"{k}_cpu_s"] for k in ("fwd", "fwdbwd")}
        )
        res["wall_ratio_fwdbwd"] = res["fwdbwd_s"] / ref["fwdbwd_s"]
    return res


COLUMNS = output.columns(
    "world=W; strategy=strategy; layout=layout; causal=causal; dtype=dtype; seq=seq; "
    "fwd_s=fwd s:.3f; fwdbwd_s=f+b s:.3f; tflops_fwdbwd_per_rank=TF/s/rank:.3f; "
    "wait_fwdbwd_s=wait s:.3f; bytes_sent_fwdbwd=MB sent:.1f/1048576; peak_rss_mb=RSS MB:.0f; "
    "sdpa_fwdbwd_cpu_s=sdpa cpu s:.3f; cpu_ratio_fwdbwd=cpu ratio:.2f",
)


def parse(argv: list[str]):
    p = h.parser("bench attention", __doc__, repeats=1)
    h.problem_args(p, world=[2, 4], seq=[4096], many=("world", "seq", "layout", "dtype"),
                   dtypes=list(h.DTYPES), extra=("kv_heads", "kernel", "batch"))  # fmt: skip
    p.set_defaults(layout=["zigzag"])
    p.add_argument("--strategy", nargs="+", default=["ring"], choices=[*STRATEGIES, "all"])
    p.add_argument("--causal", choices=["yes", "no", "both"], default="yes")
    p.add_argument("--threads", type=h.positive, default=1, help="threads per rank and SDPA")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--out", default=None, help="append JSON lines here (default: stdout)")
    args = h.parse(p, argv, rows_for)
    if not args.problems:  # only hybrid, and no W it can run at
        p.error("--strategy hybrid needs a 2-D mesh: --world 4, 6, 8, ... (even, >= 4)")
    return args


def rows_for(args) -> list[dict]:
    strategies = STRATEGIES if "all" in args.strategy else args.strategy
    causals = {"yes": [True], "no": [False], "both": [False, True]}[args.causal]
    grid = itertools.product(args.world, strategies, args.layout, causals, args.dtype, args.seq)
    return [
        h.problem_of(args, world=w, strategy=st, layout=lay, causal=c, dtype=dt, seq=s)
        for w, st, lay, c, dt, s in grid
        if st != "hybrid" or (w >= 4 and w % 2 == 0)  # hybrid needs a 2-D mesh
    ]


def main(argv: list[str]) -> int:
    args = parse(argv)
    rows = measure(args.problems, args.repeats, args.threads, not args.no_reference)
    return output.stream(rows, args.out, COLUMNS)
