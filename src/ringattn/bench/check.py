"""``ringattn check``: a verified ring-attention run on local CPU ranks.

Shards one long causal problem over W gloo ranks (zigzag), runs ring attention forward and
backward, gathers outputs and gradients, and compares them with single-process
``F.scaled_dot_product_attention`` on the whole sequence. Prints wall time, per-rank peak
memory (process peak RSS and its growth during attention) and the max errors.
"""

from __future__ import annotations

import json
import time

import torch

from ..memstat import peak_rss_mib
from ..ring import ring_attention
from . import harness as h
from . import output


def _rank(rank: int, world: int, row: dict) -> dict:
    q, k, v, do = h.local_inputs(row, rank, world, grad=True)
    # a tiny call first: gloo connects each pair of ranks lazily on its first transfer
    tiny = torch.randn(1, 2, row["heads"], row["head_dim"], requires_grad=True)
    ring_attention(tiny, tiny, tiny, causal=True, layout=row["layout"]).sum().backward()
    base = peak_rss_mib()
    t0 = time.perf_counter()
    out = ring_attention(q, k, v, causal=True, layout=row["layout"])
    t_fwd = time.perf_counter() - t0
    out.backward(do)
    t_all = time.perf_counter() - t0
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad, fwd_s=t_fwd, fwdbwd_s=t_all,
                peak_rss_mb=peak_rss_mib(), attn_rss_growth_mb=peak_rss_mib() - base)  # fmt: skip


def parse(argv: list[str]):
    p = h.parser("check", __doc__)
    h.problem_args(p, world=4, seq=32768)
    p.set_defaults(heads=4)
    p.add_argument("--json", action="store_true")
    return h.parse(p, argv, lambda a: [h.problem_of(a, world=a.world, seq=a.seq)])


def main(argv: list[str]) -> int:
    if any(x == "--device" or x.startswith("--device=") for x in argv):
        from .gpu_check import main as device_check  # the multi-GPU check (make gpu-check)

        return device_check(argv)
    a = parse(argv)
    row = a.problems[0]
    torch.set_num_threads(1)
    print(
        f"ring attention check: W={a.world} gloo ranks on CPU, seq={a.seq}, heads={a.heads}, "
        f"head_dim={a.head_dim}, causal {a.layout}, {a.dtype}",
        flush=True,
    )
    t0 = time.perf_counter()
    ranks = h.run_ranks(_rank, a.world, row, here=False)
    wall = time.perf_counter() - t0
    inputs = h.make_inputs(row)
    base = peak_rss_mib()
    ref = h.sdpa_grads(row, inputs)
    errs = h.max_errors(ref, ranks, a.layout, a.world)
    summary = dict(
        world=a.world, seq=a.seq, layout=a.layout, dtype=a.dtype,
        ring_fwd_s=max(r["fwd_s"] for r in ranks), ring_fwdbwd_s=max(r["fwdbwd_s"] for r in ranks),
        launch_total_s=wall, sdpa_fwdbwd_s=ref["wall_s"],
        peak_rss_mb_per_rank=[round(r["peak_rss_mb"]) for r in ranks],
        attn_rss_growth_mb_per_rank=[round(r["attn_rss_growth_mb"]) for r in ranks],
        sdpa_rss_growth_mb=round(peak_rss_mib() - base), max_abs_err=errs,
    )  # fmt: skip
    tol = 1e-4 if a.dtype == "fp32" else 5e-2
    ok = all(e <= tol for e in errs.values())
    errors = ", ".join(f"{n} {e:.2e}" for n, e in errs.items())
    text = (
        f"ring fwd {summary['ring_fwd_s']:.1f}s, fwd+bwd {summary['ring_fwdbwd_s']:.1f}s (slowest "
        f"rank; {a.world} ranks share {output.cores()} cores) | single-process SDPA fwd+bwd "
        f"{ref['wall_s']:.1f}s\npeak RSS per rank (MB): {summary['peak_rss_mb_per_rank']}; "
        f"growth during attention: {summary['attn_rss_growth_mb_per_rank']} vs single-process "
        f"SDPA {summary['sdpa_rss_growth_mb']}\nmax |ring - sdpa|: {errors}  -> "
        f"{'OK' if ok else 'MISMATCH'} (tol {tol:g})"
    )
    print(json.dumps(summary) if a.json else text)
    return 0 if ok else 1
