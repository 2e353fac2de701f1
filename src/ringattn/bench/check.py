"""``ringattn check``: a verified ring-attention run on local CPU ranks.

Shards one long causal problem over W gloo ranks (zigzag), runs ring attention forward and
backward, gathers outputs and gradients, and compares them with single-process
``F.scaled_dot_product_attention`` on the whole sequence. Prints wall time, per-rank peak
memory (process peak RSS and its growth during attention) and the max errors.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F

from ..launch import init_distributed, launch
from ..layouts import permutation, shard
from ..ring import ring_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(a):
    g = torch.Generator().manual_seed(0)
    shape = (1, a.seq, a.heads, a.head_dim)
    return [torch.randn(shape, generator=g).to(DTYPES[a.dtype]) for _ in range(4)]


def _rank(a) -> dict:
    rank, world, _ = init_distributed(threads=1, device="cpu")
    q, k, v, do = (shard(t, a.layout, rank=rank, world_size=world).clone() for t in _inputs(a))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    # a tiny call first: gloo connects each pair of ranks lazily on its first transfer
    tiny = torch.randn(1, 2, a.heads, a.head_dim, requires_grad=True)
    ring_attention(tiny, tiny, tiny, causal=True, layout=a.layout).sum().backward()
    base = _rss_mb()
    t0 = time.perf_counter()
    out = ring_attention(q, k, v, causal=True, layout=a.layout)
    t_fwd = time.perf_counter() - t0
    out.backward(do)
    t_all = time.perf_counter() - t0
    return dict(
        out=out.detach(),
        dq=q.grad,
        dk=k.grad,
        dv=v.grad,
        fwd_s=t_fwd,
        fwdbwd_s=t_all,
        peak_rss_mb=_rss_mb(),
        attn_rss_growth_mb=_rss_mb() - base,
    )


def parse(argv):
    p = argparse.ArgumentParser(prog="ringattn check", description=__doc__)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    a = parse(argv)
    torch.set_num_threads(1)
    print(
        f"ring attention check: W={a.world} gloo ranks on CPU, seq={a.seq}, heads={a.heads}, "
        f"head_dim={a.head_dim}, causal {a.layout}, {a.dtype}",
        flush=True,
    )
    t0 = time.perf_counter()
    res = launch(_rank, a.world, a)
    wall = time.perf_counter() - t0
    ranks = [res[r] for r in range(a.world)]
    inv = torch.argsort(permutation(a.seq, a.layout, a.world))
    got = {k: torch.cat([r[k] for r in ranks], 1)[:, inv] for k in ("out", "dq", "dk", "dv")}

    q, k, v, do = (t.transpose(1, 2).requires_grad_() for t in _inputs(a))  # (b, h, s, d)
    base = _rss_mb()
    t1 = time.perf_counter()
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref.backward(do.detach())
    t_ref = time.perf_counter() - t1
    refs = {"out": ref.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    errs = {n: float((got[n].float() - refs[n].transpose(1, 2).float()).abs().max()) for n in refs}
    summary = dict(
        world=a.world,
        seq=a.seq,
        layout=a.layout,
        dtype=a.dtype,
        ring_fwd_s=max(r["fwd_s"] for r in ranks),
        ring_fwdbwd_s=max(r["fwdbwd_s"] for r in ranks),
        launch_total_s=wall,
        sdpa_fwdbwd_s=t_ref,
        peak_rss_mb_per_rank=[round(r["peak_rss_mb"]) for r in ranks],
        attn_rss_growth_mb_per_rank=[round(r["attn_rss_growth_mb"]) for r in ranks],
        sdpa_rss_growth_mb=round(_rss_mb() - base),
        max_abs_err=errs,
    )
    tol = 1e-4 if a.dtype == "fp32" else 5e-2
    ok = all(e <= tol for e in errs.values())
    if a.json:
        print(json.dumps(summary))
    else:
        print(
            f"ring fwd {summary['ring_fwd_s']:.1f}s, fwd+bwd {summary['ring_fwdbwd_s']:.1f}s "
            f"(slowest rank; {a.world} ranks share 2 cores) | single-process SDPA fwd+bwd "
            f"{t_ref:.1f}s"
        )
        print(
            f"peak RSS per rank (MB): {summary['peak_rss_mb_per_rank']}; growth during "
            f"attention: {summary['attn_rss_growth_mb_per_rank']} vs single-process SDPA "
            f"{summary['sdpa_rss_growth_mb']}"
        )
        print(
            "max |ring - sdpa|: "
            + ", ".join(f"{n} {e:.2e}" for n, e in errs.items())
            + f"  -> {'OK' if ok else 'MISMATCH'} (tol {tol:g})"
        )
    return 0 if ok else 1
