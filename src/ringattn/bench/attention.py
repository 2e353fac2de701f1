"""``ringattn bench attention``: ring (or another strategy) on W local gloo ranks against
single-process SDPA on the same global problem, measured in the same run.

Per (W, strategy, layout, causal, dtype, seq) row: forward and forward+backward wall time
(max over ranks), CPU time summed over ranks, achieved attention TFLOP/s per rank (from the
schedule's FLOP count), time blocked waiting on communication, bytes sent per rank, peak RSS
per rank, and the SDPA reference timed in this process with the same thread count per rank.
``cpu_ratio`` = total ring CPU time / SDPA CPU time for fwd+bwd: 1.0 means the ring costs no
more CPU than one process doing the whole problem.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys

import torch

from ..comm import count_comm
from ..launch import init_distributed, launch
from ..layouts import shard
from ..schedule import attention_flops
from .common import DTYPES, ReferenceCache, clock, make_inputs, markdown_table, sdpa_reference

# Kept under their old names: other code may still import them from here.
_inputs, _clock, _sdpa_reference = make_inputs, clock, sdpa_reference
__all__ = ["DTYPES", "measure", "summarize", "table", "time_rows"]


def _attention_fn(strategy: str):
    if strategy == "ring":
        from ..ring import ring_attention

        return ring_attention
    from .. import cp  # the context-parallel family (allgather, ulysses, hybrid)

    def run(q, k, v, **kw):
        return cp.context_parallel_attention(q, k, v, strategy=strategy, **kw)

    return run


def time_rows(rows: list[dict], repeats: int, rank: int, world: int, barrier) -> list[dict]:
    """Time each row on this rank (``barrier()`` lines the ranks up before each clock).

    Used by every rank of a launched group and, for ``world == 1``, in the parent itself
    (a one-rank ring, no process group). Returns this rank's best repeat per row.
    """
    out = []
    for row in rows:
        q, k, v, do = (
            shard(t, row["layout"], rank=rank, world_size=world).contiguous()
            for t in make_inputs(row)
        )
        attn = _attention_fn(row["strategy"])
        kw = dict(causal=row["causal"], layout=row["layout"], kernel=row["kernel"])
        if row["strategy"] == "hybrid":
            from torch.distributed.device_mesh import init_device_mesh

            u = row.get("ulysses", 2)
            kw["mesh"] = init_device_mesh(
                "cpu", (world // u, u), mesh_dim_names=("ring", "ulysses")
            )
        best = None
        for _ in range(repeats + 1):  # the first run warms up (gloo connects pairs lazily)
            ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
            m: dict = {}
            barrier()
            with torch.no_grad(), count_comm() as c_fwd, clock(m, "fwd"):
                attn(ql.detach(), kl.detach(), vl.detach(), **kw)
            barrier()
            with count_comm() as c_all, clock(m, "fwdbwd"):
                attn(ql, kl, vl, **kw).backward(do)
            m.update(
                wait_fwd_s=c_fwd.wait_s,
                wait_fwdbwd_s=c_all.wait_s,
                bytes_fwd=c_fwd.total_bytes,
                bytes_fwdbwd=c_all.total_bytes,
            )
            if best is None or m["fwdbwd_s"] < best["fwdbwd_s"]:
                best = m
        best["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out.append(best)
    return out


def _rank_main(rows: list[dict], repeats: int, threads: int) -> list[dict]:
    """Runs on every rank: join the group, time each row, return per-rank measurements."""
    import torch.distributed as dist

    rank, world, _ = init_distributed(threads=threads, device="cpu")
    return time_rows(rows, repeats, rank, world, dist.barrier)


def measure(
    rows: list[dict], repeats: int = 1, threads: int = 1, reference: bool = True, on_row=None
) -> list[dict]:
    """Run ``rows`` (any mix of world sizes): one launch of W local gloo ranks per W (W = 1
    runs here, without a process group), plus the single-process SDPA reference of each
    global problem, timed once per problem in this process. Returns summarized rows in
    launch order; ``on_row(row)`` sees each as soon as it is ready."""
    torch.set_num_threads(threads)
    ref = ReferenceCache(repeats) if reference else None
    results = []
    for w in sorted({r["world"] for r in rows}):
        mine = [r for r in rows if r["world"] == w]
        if w == 1:
            per_rank = {0: time_rows(mine, repeats, 0, 1, lambda: None)}
        else:
            per_rank = launch(_rank_main, w, mine, repeats, threads)
        for i, row in enumerate(mine):
            res = summarize(row, [per_rank[r][i] for r in range(w)], ref(row) if ref else None)
            results.append(res)
            if on_row is not None:
                on_row(res)
    return results


def summarize(row: dict, ranks: list[dict], ref: dict | None) -> dict:
    world = row["world"]
    shape = dict(batch=row["batch"], heads=row["heads"], head_dim=row["head_dim"])
    args = (row["layout"], world, row["seq"], row["causal"])
    flops = attention_flops(*args, **shape)
    bflops = attention_flops(*args, **shape, backward=True)
    res = dict(row)
    res.update(
        fwd_s=max(r["fwd_s"] for r in ranks),
        fwdbwd_s=max(r["fwdbwd_s"] for r in ranks),
        fwd_cpu_s=sum(r["fwd_cpu_s"] for r in ranks),
        fwdbwd_cpu_s=sum(r["fwdbwd_cpu_s"] for r in ranks),
        wait_fwd_s=max(r["wait_fwd_s"] for r in ranks),
        wait_fwdbwd_s=max(r["wait_fwdbwd_s"] for r in ranks),
        bytes_sent_fwd=max(r["bytes_fwd"] for r in ranks),
        bytes_sent_fwdbwd=max(r["bytes_fwdbwd"] for r in ranks),
        peak_rss_mb=max(r["peak_rss_mb"] for r in ranks),
        flops_fwd_max_over_min=max(flops) / max(min(flops), 1),
        # achieved per rank = that rank's scheduled FLOPs / its own time (CPU time: with more
        # ranks than cores, wall time includes waiting for a core)
        tflops_fwd_per_rank=min(f / r["fwd_cpu_s"] for f, r in zip(flops, ranks)) / 1e12,
        tflops_fwdbwd_per_rank=min(
            (f + bf) / r["fwdbwd_cpu_s"] for f, bf, r in zip(flops, bflops, ranks)
        )
        / 1e12,
        # per rank, in rank order: what scaling and layout tables are made of
        fwd_cpu_per_rank=[r["fwd_cpu_s"] for r in ranks],
        fwdbwd_cpu_per_rank=[r["fwdbwd_cpu_s"] for r in ranks],
        fwdbwd_wall_per_rank=[r["fwdbwd_s"] for r in ranks],
        fwdbwd_cpu_max_s=max(r["fwdbwd_cpu_s"] for r in ranks),
        flops_fwdbwd_per_rank=[f + bf for f, bf in zip(flops, bflops)],
    )
    if ref is not None:
        res.update({f"sdpa_{k}": v for k, v in ref.items()})
        res["cpu_ratio_fwd"] = res["fwd_cpu_s"] / ref["fwd_cpu_s"]
        res["cpu_ratio_fwdbwd"] = res["fwdbwd_cpu_s"] / ref["fwdbwd_cpu_s"]
        res["wall_ratio_fwdbwd"] = res["fwdbwd_s"] / ref["fwdbwd_s"]
    return res


COLUMNS = [
    ("world", "W", "{}"),
    ("strategy", "strategy", "{}"),
    ("layout", "layout", "{}"),
    ("causal", "causal", "{}"),
    ("dtype", "dtype", "{}"),
    ("seq", "seq", "{}"),
    ("fwd_s", "fwd s", "{:.3f}"),
    ("fwdbwd_s", "f+b s", "{:.3f}"),
    ("tflops_fwdbwd_per_rank", "TF/s/rank", "{:.3f}"),
    ("wait_fwdbwd_s", "wait s", "{:.3f}"),
    ("bytes_sent_fwdbwd", "MB sent", "{}"),
    ("peak_rss_mb", "RSS MB", "{:.0f}"),
    ("sdpa_fwdbwd_cpu_s", "sdpa cpu s", "{:.3f}"),
    ("cpu_ratio_fwdbwd", "cpu ratio", "{:.2f}"),
]


def _mb(r: dict) -> str:
    v = r.get("bytes_sent_fwdbwd")
    return "-" if v is None else f"{v / 2**20:.1f}"


def table(rows: list[dict]) -> str:
    cols = [(k, h, _mb if k == "bytes_sent_fwdbwd" else f) for k, h, f in COLUMNS]
    return markdown_table(rows, cols)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ringattn bench attention", description=__doc__)
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument(
        "--strategy", nargs="+", default=["ring"], help="ring allgather ulysses hybrid, or 'all'"
    )
    p.add_argument("--layout", nargs="+", default=["zigzag"])
    p.add_argument("--causal", choices=["yes", "no", "both"], default="yes")
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--seq", type=int, nargs="+", default=[4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--kernel", default="auto")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="threads per rank and for SDPA")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--out", default=None, help="append JSON lines here (default: stdout)")
    return p.parse_args(argv)


def rows_for(args) -> list[dict]:
    strategies = (
        ["ring", "allgather", "ulysses", "hybrid"] if "all" in args.strategy else (args.strategy)
    )
    causals = {"yes": [True], "no": [False], "both": [False, True]}[args.causal]
    rows = []
    for w, st, lay, c, dt, s in itertools.product(
        args.world, strategies, args.layout, causals, args.dtype, args.seq
    ):
        if st == "hybrid" and (w < 4 or w % 2):
            continue  # needs a 2-D mesh
        rows.append(
            dict(
                world=w,
                strategy=st,
                layout=lay,
                causal=c,
                dtype=dt,
                seq=s,
                batch=args.batch,
                heads=args.heads,
                kv_heads=args.kv_heads or args.heads,
                head_dim=args.head_dim,
                kernel=args.kernel,
            )
        )
    return rows


def main(argv: list[str]) -> int:
    args = parse(argv)
    sink = open(args.out, "a") if args.out else sys.stdout  # noqa: SIM115
    try:
        results = measure(
            rows_for(args),
            args.repeats,
            args.threads,
            reference=not args.no_reference,
            on_row=lambda res: print(json.dumps(res), file=sink, flush=True),
        )
    finally:
        if args.out:
            sink.close()
    print(table(results), file=sys.stderr if not args.out else sys.stdout)
    return 0
