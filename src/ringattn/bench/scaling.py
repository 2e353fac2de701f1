"""``ringattn bench scaling`` (strong: fixed global problem, W grows, against single-process
SDPA) and ``ringattn bench weak`` (W and the global sequence double together). Wall time
includes waiting for a core; CPU/rank is a rank's time on a core of its own. See
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse

from . import harness as h
from . import output
from .attention import measure


def _parse(name: str, argv: list[str], world: list[int], seq, pairs) -> argparse.Namespace:
    """The shared options; ``pairs(args)`` gives the (world, seq) problems, checked here."""
    p = h.parser(f"bench {name}", __doc__, out=name, repeats=1)
    h.problem_args(p, world=world, seq=seq, many=("world", "seq"), extra=("kv_heads", "kernel"))
    if seq is None:
        p.add_argument("--seq-per-rank", type=h.positive, default=1024)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=h.positive, default=1, help="threads per rank and SDPA")
    probs = lambda a: [h.problem_of(a, world=w, seq=s) for w, s in pairs(a)]
    return h.parse(p, argv, probs, seq_opt="--seq" if seq else "--seq-per-rank")


# --- strong -------------------------------------------------------------------------------


def strong_rows(results: list[dict]) -> list[dict]:
    """One SDPA row per global seq (W = 1, from the cached reference), then the ring rows."""
    keep = ("seq", "layout", "causal", "dtype", "heads", "head_dim")
    sdpa = {r["seq"]: dict({k: r[k] for k in keep}, impl="sdpa", world=1,
                           fwdbwd_s=r["sdpa_fwdbwd_s"], fwdbwd_cpu_s=r["sdpa_fwdbwd_cpu_s"],
                           fwdbwd_cpu_max_s=r["sdpa_fwdbwd_cpu_s"]) for r in results}  # fmt: skip
    ring = [dict(r, impl="ring", speedup_dedicated=r["sdpa_fwdbwd_cpu_s"] / r["fwdbwd_cpu_max_s"])
            for r in results]  # fmt: skip
    return sorted([*sdpa.values(), *ring], key=lambda r: (r["seq"], r["world"]))


STRONG_COLUMNS = output.columns(
    "seq=global seq; impl=impl; world=W; fwdbwd_s=f+b wall s:.3f; "
    "fwdbwd_cpu_max_s=CPU/rank s:.3f; fwdbwd_cpu_s=CPU total s:.3f; "
    "speedup_dedicated=SDPA / CPU per rank:.2f; cpu_ratio_fwdbwd=CPU total / SDPA:.2f; "
    "wait_fwdbwd_s=wait s:.3f",
)

NOTES = (
    "W ranks share {cores} cores; fwd+bwd, causal {layout}, {dtype}, {heads} heads x {head_dim}. "
    "Columns: docs/benchmarks.md#strong-scaling."
)


def plot_strong(rows: list[dict], path: str) -> None:
    fig, axes = output.figure(2, figsize=(10, 4))
    sdpa = [r for r in rows if r["impl"] == "sdpa"]
    worlds = sorted({r["world"] for r in rows if r["impl"] == "ring"})
    for ax, key, title in (
        (axes[0], "fwdbwd_cpu_max_s", "CPU time of the busiest rank (own core)"),
        (axes[1], "fwdbwd_s", "wall time (ranks share the cores)"),
    ):
        ax.plot([r["seq"] for r in sdpa], [r[key] for r in sdpa], "k-o", label="SDPA, 1 process")
        for w in worlds:
            mine = [r for r in rows if r["impl"] == "ring" and r["world"] == w]
            ax.plot([r["seq"] for r in mine], [r[key] for r in mine], "-o", label=f"ring W={w}")
        output.style(ax, "global sequence (tokens)", "fwd+bwd seconds", title, logx=2, logy=10)
    r0 = rows[0]
    causal = "causal " if r0["causal"] else ""
    output.save(fig, path, rows, f"strong scaling: {causal}{r0['layout']}, {r0['dtype']}, "
                f"{r0['heads']} heads x {r0['head_dim']}")  # fmt: skip


def strong_main(argv: list[str]) -> int:
    pairs = lambda a: [(w, s) for w in a.world for s in a.seq]
    args = _parse("scaling", argv, [2, 4, 8], [2048, 4096, 8192], pairs)
    rows = strong_rows(list(measure(args.problems, args.repeats, args.threads)))
    return output.report(output.stamp(rows, "scaling"), args, [STRONG_COLUMNS], NOTES, plot_strong)


# --- weak ---------------------------------------------------------------------------------


def weak_rows(results: list[dict]) -> list[dict]:
    """Add the per-step time and the flatness relative to the smallest W."""
    rows = sorted(results, key=lambda r: r["world"])
    step = [r["fwdbwd_cpu_max_s"] / r["world"] for r in rows]  # CPU per rank per ring step
    return [dict(r, local_seq=r["seq"] // r["world"], cpu_per_step_s=s, step_vs_first=s / step[0])
            for r, s in zip(rows, step)]  # fmt: skip


WEAK_COLUMNS = output.columns(
    "world=W; seq=global seq; local_seq=tokens/rank; fwdbwd_cpu_max_s=CPU/rank s:.3f; "
    "cpu_per_step_s=CPU/rank/step s:.4f; step_vs_first=step / first:.2f; "
    "tflops_fwdbwd_per_rank=TF/s/rank:.3f; fwdbwd_s=wall s:.3f; "
    "peak_rss_mb=peak RSS MB/rank:.0f",
)

WEAK_NOTES = (
    "{seq_per_rank} tokens per rank, W ranks share {cores} cores; W = 1 is the one-rank ring in "
    "this process. Columns: docs/benchmarks.md#weak-scaling."
)


def plot_weak(rows: list[dict], path: str) -> None:
    fig, axes = output.figure(2, figsize=(10, 4))
    w = [r["world"] for r in rows]
    axes[0].plot(w, [r["cpu_per_step_s"] for r in rows], "-o", label="CPU per rank per step")
    axes[0].plot(w, [r["fwdbwd_cpu_max_s"] for r in rows], "-s", label="CPU per rank (all steps)")
    axes[0].plot(w, [r["fwdbwd_s"] for r in rows], "--^", label="wall (shared cores)")
    axes[1].plot(w, [r["tflops_fwdbwd_per_rank"] for r in rows], "-o")
    axes[1].set_ylim(bottom=0)
    x = "W (global seq = W x tokens per rank)"
    per_rank = f"{rows[0]['seq'] // rows[0]['world']} tokens per rank"
    output.style(axes[0], x, "fwd+bwd seconds", per_rank, logx=2, logy=10, ticks=w)
    output.style(axes[1], x, "TFLOP/s per rank (CPU time)", "kernel throughput per rank", logx=2,
            ticks=w, legend=0)  # fmt: skip
    output.save(fig, path, rows, "weak scaling")


def weak_main(argv: list[str]) -> int:
    pairs = lambda a: [(w, w * a.seq_per_rank) for w in a.world]
    args = _parse("weak", argv, [1, 2, 4, 8], None, pairs)
    results = measure(args.problems, args.repeats, args.threads, reference=False)
    rows = output.stamp(weak_rows(results), "weak")
    return output.report(rows, args, [WEAK_COLUMNS], WEAK_NOTES, plot_weak)
