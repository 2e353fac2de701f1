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
import contextlib
import itertools
import json
import resource
import sys
import time

import torch
import torch.nn.functional as F

from ..comm import count_comm
from ..launch import init_distributed, launch
from ..layouts import shard
from ..schedule import attention_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inputs(row: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, s, h, hk, d = row["batch"], row["seq"], row["heads"], row["kv_heads"], row["head_dim"]
    dt = DTYPES[row["dtype"]]
    q = torch.randn(b, s, h, d, generator=g).to(dt)
    k = torch.randn(b, s, hk, d, generator=g).to(dt)
    v = torch.randn(b, s, hk, d, generator=g).to(dt)
    do = torch.randn(b, s, h, d, generator=g).to(dt)
    return q, k, v, do


@contextlib.contextmanager
def _clock(into: dict, key: str):
    """Wall time into[key + '_s'] and this process's CPU time into[key + '_cpu_s']."""
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    into[f"{key}_s"] = time.perf_counter() - t0
    into[f"{key}_cpu_s"] = time.process_time() - c0


def _attention_fn(strategy: str):
    if strategy == "ring":
        from ..ring import ring_attention

        return ring_attention
    from .. import cp  # the context-parallel family (allgather, ulysses, hybrid)

    def run(q, k, v, **kw):
        return cp.context_parallel_attention(q, k, v, strategy=strategy, **kw)

    return run


def _rank_main(rows: list[dict], repeats: int, threads: int) -> list[dict]:
    """Runs on every rank: time each row, return per-rank measurements."""
    import torch.distributed as dist

    rank, world, _ = init_distributed(threads=threads, device="cpu")
    out = []
    for row in rows:
        q, k, v, do = (
            shard(t, row["layout"], rank=rank, world_size=world).contiguous() for t in _inputs(row)
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
        for _ in range(repeats + 1):  # the first run warms up
            ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
            m: dict = {}
            dist.barrier()
            with count_comm() as c_fwd, _clock(m, "fwd"):
                attn(ql.detach(), kl.detach(), vl.detach(), **kw)
            dist.barrier()
            with count_comm() as c_all, _clock(m, "fwdbwd"):
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


def _sdpa_reference(row: dict, repeats: int) -> dict:
    q, k, v, do = (t.transpose(1, 2) for t in _inputs(row))  # (b, h, s, d) views
    kw = dict(is_causal=row["causal"], enable_gqa=row["heads"] != row["kv_heads"])
    best = None
    for _ in range(repeats + 1):
        ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
        m: dict = {}
        with _clock(m, "fwd"):
            F.scaled_dot_product_attention(q, k, v, **kw)
        with _clock(m, "fwdbwd"):
            F.scaled_dot_product_attention(ql, kl, vl, **kw).backward(do)
        if best is None or m["fwdbwd_s"] < best["fwdbwd_s"]:
            best = m
    return best


def summarize(row: dict, ranks: list[dict], ref: dict | None) -> dict:
    world = row["world"]
    flops = attention_flops(
        row["layout"],
        world,
        row["seq"],
        row["causal"],
        batch=row["batch"],
        heads=row["heads"],
        head_dim=row["head_dim"],
    )
    bflops = attention_flops(
        row["layout"],
        world,
        row["seq"],
        row["causal"],
        batch=row["batch"],
        heads=row["heads"],
        head_dim=row["head_dim"],
        backward=True,
    )
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


def table(rows: list[dict]) -> str:
    def cell(r, key, fmt):
        v = r.get(key)
        if v is None:
            return "-"
        if key == "bytes_sent_fwdbwd":
            return f"{v / 2**20:.1f}"
        return fmt.format(v)

    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


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
    torch.set_num_threads(args.threads)
    rows = rows_for(args)
    results = []
    sink = open(args.out, "a") if args.out else sys.stdout  # noqa: SIM115
    try:
        for w in sorted({r["world"] for r in rows}):
            mine = [r for r in rows if r["world"] == w]
            per_rank = launch(_rank_main, w, mine, args.repeats, args.threads)
            for i, row in enumerate(mine):
                ref = None if args.no_reference else _sdpa_reference(row, args.repeats)
                res = summarize(row, [per_rank[r][i] for r in range(w)], ref)
                results.append(res)
                print(json.dumps(res), file=sink, flush=True)
    finally:
        if args.out:
            sink.close()
    print(table(results), file=sys.stderr if not args.out else sys.stdout)
    return 0
