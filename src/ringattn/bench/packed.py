"""``ringattn bench packed``: causal load balance over packed documents, per layout.

Document lengths are lognormal (median ``--median`` tokens, sigma ``--sigma``), clipped to
[64, pack], seeded; each pack of ``seq`` tokens is filled with whole documents and the last
one cut to fit (no padding). For contiguous, zigzag, striped and "packed"
(:mod:`ringattn.balance`) at W = 2, 4, 8:

- **FLOPs** per rank from the real mask: :func:`ringattn.mask_plan.mask_flops` (causal x
  documents, fwd+bwd), max/min over ranks, and the fraction a document mask saves against
  full causal attention over the pack (blocks with no allowed pair are skipped);
- **time** per rank, measured: each rank's ring plan (the exact kernel calls it makes,
  forward then backward) replayed in this process, one rank after the other, CPU seconds,
  best of ``--repeats``; no communication, so 2 shared cores do not blur the comparison;
  with ``--ring`` also the real ring on W local gloo ranks (each rank's own CPU seconds);
- **balancer speed**: milliseconds to build the "packed" layout for 10^4 documents.

Pure functions return rows; :func:`main` checks the arguments, then writes through the
harness (:mod:`.output`: JSON lines, markdown tables, the PNG).
"""

from __future__ import annotations

import argparse
import random

import torch

from ..balance import MIN_DOC, lognormal_pack, packed_runs
from ..kernels import fused
from ..mask_plan import mask_flops, plan_flops, ring_mask_plan
from ..schedule import balance
from . import harness as h
from . import output

LAYOUTS = ("contiguous", "zigzag", "striped", "packed")


def _ratio(xs) -> float:
    return balance(xs)["max_over_min"]


def flops_rows(seqs, worlds, seeds, *, median=1024.0, sigma=1.5, heads=8, head_dim=64):
    """One row per (seq, seed, W, layout): per-rank fwd+bwd FLOPs under the document mask."""
    rows = []
    for seq, seed in ((s, sd) for s in seqs for sd in seeds):
        cu = lognormal_pack(seq, seed, median, sigma)
        full = 14.0 * heads * head_dim * seq * (seq + 1) / 2  # full causal, fwd (4) + bwd (10)
        for world in worlds:
            n = seq // world
            for layout in LAYOUTS:
                kw = dict(causal=True, cu_seqlens=cu, heads=heads, head_dim=head_dim)
                fl = [3.5 * f for f in mask_flops(layout, world, seq, **kw)]  # fwd 4 + bwd 10
                plans = [
                    ring_mask_plan(layout, world, r, n, causal=True, cu=cu) for r in range(world)
                ]
                calls = [sum(len(step) for step in p) for p in plans]
                # pairs the kernels compute (a masked box counts whole) over the allowed ones
                computed = sum(plan_flops(p, n, n, allowed=False) for p in plans) / 4
                allowed = sum(fl) / (14.0 * heads * head_dim)
                rows.append(
                    dict(
                        kind="flops", seq=seq, seed=seed, world=world, layout=layout,
                        n_docs=len(cu) - 1, flops_per_rank=fl, flops_max_over_min=_ratio(fl),
                        saved_vs_causal=1.0 - sum(fl) / full,
                        computed_over_allowed=computed / allowed,
                        kernel_calls_max=max(calls),
                    )
                )  # fmt: skip
    return rows


def replay_rank(plan, n: int, heads: int, head_dim: int, repeats: int) -> float:
    """CPU seconds of one rank's kernel calls, forward then backward (its own K/V stands in
    for every source's: the cost depends on the shapes and masks, not the values)."""
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, heads, n, head_dim, generator=g) for _ in range(4))
    works = [w for step in plan for w in step]
    scale = head_dim**-0.5

    def once():
        for w in works:
            qb, kb, vb = q[:, :, w.q], k[:, :, w.kv], v[:, :, w.kv]
            kw = dict(causal=w.causal, scale=scale, mask=w.mask)
            out, lse = fused.cpu_forward(qb, kb, vb, **kw)
            fused.cpu_backward(do[:, :, w.q], qb, kb, vb, out, lse, **kw)

    return h.timed(once, repeats)[0]["cpu_s"]  # best CPU s after a warm-up


def time_rows(seq, worlds, seed, *, median=1024.0, sigma=1.5, heads=4, head_dim=64, repeats=2):
    """One row per (W, layout): measured fwd+bwd CPU seconds of every rank's plan."""
    cu = lognormal_pack(seq, seed, median, sigma)
    rows = []
    for world in worlds:
        n = seq // world
        for layout in LAYOUTS:
            plans = [ring_mask_plan(layout, world, r, n, causal=True, cu=cu) for r in range(world)]
            t = [replay_rank(p, n, heads, head_dim, repeats) for p in plans]
            rows.append(
                dict(kind="time", seq=seq, seed=seed, world=world, layout=layout,
                     n_docs=len(cu) - 1, heads=heads, head_dim=head_dim, dtype="fp32",
                     fwdbwd_cpu_s_per_rank=t, time_max_over_min=_ratio(t))
            )  # fmt: skip
    return rows


def _ring_rank(rank: int, world: int, seq: int, cu: tuple, heads, head_dim, repeats):
    """On every launched rank: fwd+bwd of the real ring per layout; this rank's CPU and wall
    seconds (the call with the least CPU time of ``repeats``, after a warm-up)."""
    from ..cp import context_parallel_attention
    from ..layouts import shard

    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, seq, heads, head_dim, generator=g) for _ in range(4)]
    cu_t, out = torch.tensor(cu), []
    for layout in LAYOUTS:
        q, k, v, do = (shard(x, layout, rank=rank, world_size=world, cu_seqlens=cu) for x in full)

        def run(layout=layout, q=q, k=k, v=v, do=do) -> dict:
            ql, kl, vl = (x.clone().requires_grad_() for x in (q, k, v))
            h.barrier()
            m: dict = {}
            with h.clock(m):
                o = context_parallel_attention(
                    ql, kl, vl, causal=True, layout=layout, cu_seqlens=cu_t
                )
                o.backward(do)
            return m

        best = h.timed(run, repeats)[0]  # the warm-up builds the plans and gloo pairs
        out.append(dict(layout=layout, cpu_s=best["cpu_s"], wall_s=best["wall_s"]))
    return out


def ring_rows(seq, worlds, seed, *, median=1024.0, sigma=1.5, heads=4, head_dim=64, repeats=2):
    """One row per (W, layout): the real ring on W local gloo ranks, each rank's fwd+bwd CPU
    seconds (compute and its share of gloo's copies; ranks share the machine's cores)."""
    cu = lognormal_pack(seq, seed, median, sigma)
    rows = []
    for world in worlds:
        per_rank = h.run_ranks(_ring_rank, world, seq, cu, heads, head_dim, repeats, here=False)
        for i, layout in enumerate(LAYOUTS):
            cpu = [per_rank[r][i]["cpu_s"] for r in range(world)]
            rows.append(
                dict(kind="ring", seq=seq, seed=seed, world=world, layout=layout,
                     n_docs=len(cu) - 1, heads=heads, head_dim=head_dim, dtype="fp32",
                     fwdbwd_cpu_s_per_rank=cpu, time_max_over_min=_ratio(cpu),
                     wall_s=max(per_rank[r][i]["wall_s"] for r in range(world)))
            )  # fmt: skip
    return rows


def speed_row(n_docs: int = 10_000, world: int = 8, repeats: int = 20) -> dict:
    """CPU milliseconds to build the "packed" layout of ``n_docs`` documents (best of
    ``repeats``; CPU time, since wall time on a shared machine counts waiting for a core)."""
    rng = random.Random(0)
    cu = [0]
    for _ in range(n_docs):
        cu.append(cu[-1] + rng.randint(1, 64))
    cu[-1] += -cu[-1] % world

    def build() -> None:  # from scratch: the layout is cached per (cu_seqlens, W)
        packed_runs.cache_clear()
        packed_runs(tuple(cu), world)

    best = h.timed(build, repeats, warmup=0)[0]["cpu_s"]
    return dict(kind="speed", n_docs=n_docs, world=world, seq=cu[-1], balance_ms=best * 1e3)


FLOP_COLUMNS = [
    ("seq", "pack", "{}"), ("n_docs", "docs", "{}"), ("world", "W", "{}"),
    ("layout", "layout", "{}"), ("flops_max_over_min", "FLOPs max/min", "{:.3f}"),
    ("saved_vs_causal", "saved vs full causal", "{:.1%}"),
    ("kernel_calls_max", "kernel calls (max rank)", "{}"),
]  # fmt: skip
TIME_COLUMNS = [
    ("kind", "measured", lambda r: {"time": "replay", "ring": "gloo ring"}[r["kind"]]),
    ("seq", "pack", "{}"), ("n_docs", "docs", "{}"), ("world", "W", "{}"),
    ("layout", "layout", "{}"),
    ("fwdbwd_cpu_s_per_rank", "fwd+bwd CPU s per rank",
     lambda r: " ".join(f"{x:.3f}" for x in r["fwdbwd_cpu_s_per_rank"])),
    ("time_max_over_min", "time max/min", "{:.3f}"),
]  # fmt: skip


def _bars(ax, sub: list[dict], value) -> list[int]:
    """One bar per (W, layout) of ``value(row)`` (the worst pack when several); the W's."""
    worlds = sorted({r["world"] for r in sub})
    width = 0.8 / len(LAYOUTS)
    for i, layout in enumerate(LAYOUTS):
        ys = [max(value(r) for r in sub if r["world"] == w and r["layout"] == layout)
              for w in worlds]  # fmt: skip
        xs = [x + (i - (len(LAYOUTS) - 1) / 2) * width for x in range(len(worlds))]
        ax.bar(xs, ys, width, label=layout)
    ax.set_xticks(range(len(worlds)), [f"W={w}" for w in worlds])
    return worlds


def plot(rows: list[dict], path: str) -> None:
    fig, axes = output.figure(3, figsize=(15, 3.8))
    for ax, kind, key, label, target in (
        (axes[0], "flops", "flops_max_over_min", "FLOPs max/min (mask_plan, worst pack)", 1.05),
        (axes[1], "time", "time_max_over_min", "fwd+bwd time max/min (replayed plans)", 1.10),
    ):
        _bars(ax, [r for r in rows if r["kind"] == kind], lambda r, key=key: r[key])
        ax.set_yscale("log")
        ax.axhline(target, color="k", lw=0.8, ls="--")
        output.style(ax, "", label)
    # the slowest rank sets the pace of the ring
    _bars(axes[2], [r for r in rows if r["kind"] == "time"],
          lambda r: max(r["fwdbwd_cpu_s_per_rank"]))  # fmt: skip
    output.style(axes[2], "", "slowest rank, fwd+bwd CPU s (replayed)")
    output.save(fig, path, rows, "packed documents (lognormal lengths): load balance per layout")


def non_negative(text: str) -> int:
    """argparse type: an int >= 0 (``--time-seq 0`` skips the timing)."""
    return 0 if text.strip() == "0" else h.positive(text)


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """In the parent, before any rank starts: every pack must split over every W in every
    layout (zigzag: into 2W chunks); ``p.error`` (one line, exit 2) names the option."""
    probs = [(s, w, "--seq", "--world") for s in args.seq for w in args.world]
    if args.time_seq:
        probs += [(args.time_seq, w, "--time-seq", "--time-world") for w in args.time_world]
    for seq, world, seq_opt, world_opt in probs:
        rows = [h.problem(world=world, seq=seq, layout=lay) for lay in LAYOUTS]
        h.check_problems(p, rows, seq_opt=seq_opt, world_opt=world_opt)
    if not args.sigma >= 0 or not args.median >= 1:
        p.error(f"--median {args.median:g} / --sigma {args.sigma:g}: use a median >= 1 token "
                "and a sigma >= 0 (lognormal document lengths)")  # fmt: skip


NOTES = (
    "Lognormal documents (median {median:g}, sigma {sigma:g}, {min_doc} tokens to the pack), "
    "causal, no padding. FLOPs: mask_plan.mask_flops, fwd+bwd, 8 heads x 64; saved = 1 - "
    "document-masked / full causal FLOPs. Time: each rank's ring plan replayed (fwd+bwd "
    "kernel calls, fp32, 4 heads x 64), CPU s, best of {repeats}; gloo ring (--ring): the "
    "real ring on W local ranks, each rank's own CPU s (compute + its share of gloo's "
    "copies). Balancer: {balance_ms:.2f} ms CPU for {n_docs} documents at W={world}."
)


def main(argv: list[str]) -> int:
    p = h.parser("bench packed", __doc__, out="packed", repeats=2)
    p.add_argument("--seq", type=h.positive, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--world", type=h.positive, nargs="+", default=[2, 4, 8])
    p.add_argument("--seeds", type=h.positive, default=2, help="packs per length")
    p.add_argument("--median", type=float, default=1024.0)
    p.add_argument("--sigma", type=float, default=1.5)
    p.add_argument("--time-seq", type=non_negative, default=16384, help="pack measured (0: skip)")
    p.add_argument("--time-world", type=h.positive, nargs="+", default=[4, 8])
    p.add_argument("--ring", action="store_true", help="also time the real ring (gloo ranks)")
    args = p.parse_args(argv)
    check_args(p, args)
    dist = dict(median=args.median, sigma=args.sigma)
    rows = flops_rows(args.seq, args.world, range(args.seeds), **dist)
    if args.time_seq:
        rows += time_rows(args.time_seq, args.time_world, 0, repeats=args.repeats, **dist)
        if args.ring:
            rows += ring_rows(args.time_seq, args.time_world, 0, repeats=args.repeats, **dist)
    rows = output.stamp([*rows, speed_row()], "packed")
    fl = [r for r in rows if r["kind"] == "flops"]
    tm = [r for r in rows if r["kind"] in ("time", "ring")]
    tables = [(fl, FLOP_COLUMNS)] + ([(tm, TIME_COLUMNS)] if tm else [])
    sp = rows[-1]  # the balancer's speed
    return output.report(rows, args, tables, NOTES, plot, min_doc=MIN_DOC,
                         balance_ms=sp["balance_ms"], n_docs=sp["n_docs"],
                         world=sp["world"])  # fmt: skip
