"""``ringattn bench scaling`` (strong) and ``ringattn bench weak``.

Strong scaling: the global problem is fixed, W grows. For each global sequence: the
single-process SDPA reference and the ring at W = 2, 4, 8 (causal zigzag by default).

Weak scaling: W and the global sequence double together, so every rank holds the same
number of tokens. Per-rank *memory* and the work of one ring *step* stay flat; the total
per-rank work grows like W because attention is quadratic (each rank meets W blocks of the
same size). The table shows both: time per rank and time per ring step (= / W).

Times on a machine with fewer cores than ranks: ``wall`` (slowest rank, from a barrier)
includes waiting for a core; ``CPU/rank`` is the busiest rank's own CPU time (all its
threads: compute plus gloo's copies) -- what a rank would take on a core of its own when
communication hides behind compute. ``CPU total`` sums over ranks: the cost of the problem.
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


def _problem_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag", "striped"])
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--kernel", default="auto")
    p.add_argument("--repeats", type=int, default=1, help="timed runs after one warm-up")
    p.add_argument("--threads", type=int, default=1, help="threads per rank and for SDPA")


def _rows(args, pairs) -> list[dict]:
    """Problems for (world, seq) pairs with the shared shape arguments."""
    return [
        problem(
            world=w,
            seq=s,
            layout=args.layout,
            causal=args.causal,
            dtype=args.dtype,
            heads=args.heads,
            kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            kernel=args.kernel,
        )
        for w, s in pairs
    ]


def _stamp(rows: list[dict], bench: str) -> list[dict]:
    m = machine()
    for r in rows:
        r.update(bench=bench, machine=m)
    return rows


# --- strong -------------------------------------------------------------------------------


def strong_rows(results: list[dict]) -> list[dict]:
    """One SDPA row per global seq (W = 1, from the cached reference), then the ring rows."""
    out, seen = [], set()
    for r in results:
        if r["seq"] not in seen:
            seen.add(r["seq"])
            ref = {k: r[k] for k in ("seq", "layout", "causal", "dtype", "heads", "head_dim")}
            out.append(
                dict(
                    ref,
                    impl="sdpa",
                    world=1,
                    fwdbwd_s=r["sdpa_fwdbwd_s"],
                    fwdbwd_cpu_s=r["sdpa_fwdbwd_cpu_s"],
                    fwdbwd_cpu_max_s=r["sdpa_fwdbwd_cpu_s"],
                )
            )
    for r in results:
        out.append(
            dict(r, impl="ring", speedup_dedicated=r["sdpa_fwdbwd_cpu_s"] / r["fwdbwd_cpu_max_s"])
        )
    return sorted(out, key=lambda r: (r["seq"], r["world"]))


STRONG_COLUMNS = [
    ("seq", "global seq", "{}"),
    ("impl", "impl", "{}"),
    ("world", "W", "{}"),
    ("fwdbwd_s", "f+b wall s", "{:.3f}"),
    ("fwdbwd_cpu_max_s", "CPU/rank s", "{:.3f}"),
    ("fwdbwd_cpu_s", "CPU total s", "{:.3f}"),
    ("speedup_dedicated", "SDPA / CPU per rank", "{:.2f}"),
    ("cpu_ratio_fwdbwd", "CPU total / SDPA", "{:.2f}"),
    ("wait_fwdbwd_s", "wait s", "{:.3f}"),
]

NOTES = (
    "wall: slowest rank, fwd+bwd, W ranks sharing {cores} cores (so W > {cores} waits for a "
    "core). CPU/rank: the busiest rank's CPU time (compute + gloo threads), i.e. its time "
    "with a core of its own. SDPA / CPU per rank: speed-up over one process if each rank had "
    "its own core (ideal: W, less for the per-step overhead). CPU total / SDPA: the CPU cost "
    "of distributing. wait: time blocked on transfers (slowest rank)."
)


def plot_strong(rows: list[dict], path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
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
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global sequence (tokens)")
        ax.set_ylabel("fwd+bwd seconds")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(
        f"strong scaling: {'causal ' if r0['causal'] else ''}{r0['layout']}, {r0['dtype']}, "
        f"{r0['heads']} heads x {r0['head_dim']}",
        fontsize=10,
    )
    save(fig, path, machine_line(r0.get("machine") or rows[-1].get("machine")))


def strong_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ringattn bench scaling", description=__doc__)
    p.add_argument("--world", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192])
    _problem_args(p)
    add_output_args(p, "scaling")
    args = p.parse_args(argv)
    results = measure(_rows(args, [(w, s) for w in args.world for s in args.seq]), args.repeats)
    rows = _stamp(strong_rows(results), "scaling")
    report(rows, markdown_table(rows, STRONG_COLUMNS), args, NOTES.format(cores=cores()))
    if args.png:
        plot_strong(rows, args.png)
    return 0


# --- weak ---------------------------------------------------------------------------------


def weak_rows(results: list[dict]) -> list[dict]:
    """Add the per-step time and the flatness relative to the smallest W."""
    results = sorted(results, key=lambda r: r["world"])
    base = results[0]
    out = []
    for r in results:
        per_step = r["fwdbwd_cpu_max_s"] / r["world"]
        out.append(
            dict(
                r,
                local_seq=r["seq"] // r["world"],
                cpu_per_step_s=per_step,
                step_vs_first=per_step / (base["fwdbwd_cpu_max_s"] / base["world"]),
            )
        )
    return out


WEAK_COLUMNS = [
    ("world", "W", "{}"),
    ("seq", "global seq", "{}"),
    ("local_seq", "tokens/rank", "{}"),
    ("fwdbwd_cpu_max_s", "CPU/rank s", "{:.3f}"),
    ("cpu_per_step_s", "CPU/rank/step s", "{:.4f}"),
    ("step_vs_first", "step / first", "{:.2f}"),
    ("tflops_fwdbwd_per_rank", "TF/s/rank", "{:.3f}"),
    ("fwdbwd_s", "wall s", "{:.3f}"),
    ("peak_rss_mb", "peak RSS MB/rank", "{:.0f}"),
]

WEAK_NOTES = (
    "Tokens per rank are fixed. CPU/rank/step = the busiest rank's fwd+bwd CPU time / W: the "
    "work of one ring step, which is what stays flat (a step is one block pair of the same "
    "size); CPU/rank itself grows ~W (attention is quadratic in the global sequence). "
    "TF/s/rank (scheduled FLOPs / the rank's CPU time) flat = no loss of kernel efficiency. "
    "W = 1 is the one-rank ring in the parent process (no process group). wall: {cores} "
    "cores shared by W ranks."
)


def plot_weak(rows: list[dict], path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    w = [r["world"] for r in rows]
    axes[0].plot(w, [r["cpu_per_step_s"] for r in rows], "-o", label="CPU per rank per step")
    axes[0].plot(w, [r["fwdbwd_cpu_max_s"] for r in rows], "-s", label="CPU per rank (all steps)")
    axes[0].plot(w, [r["fwdbwd_s"] for r in rows], "--^", label="wall (shared cores)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("fwd+bwd seconds")
    axes[0].set_title(f"{rows[0]['seq'] // rows[0]['world']} tokens per rank", fontsize=9)
    axes[1].plot(w, [r["tflops_fwdbwd_per_rank"] for r in rows], "-o")
    axes[1].set_ylim(bottom=0)
    axes[1].set_ylabel("TFLOP/s per rank (CPU time)")
    axes[1].set_title("kernel throughput per rank", fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(w, [str(x) for x in w])
        ax.set_xlabel("W (global seq = W x tokens per rank)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("weak scaling", fontsize=10)
    save(fig, path, machine_line(rows[-1].get("machine")))


def weak_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ringattn bench weak", description=__doc__)
    p.add_argument("--world", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seq-per-rank", type=int, default=1024)
    _problem_args(p)
    add_output_args(p, "weak")
    args = p.parse_args(argv)
    pairs = [(w, w * args.seq_per_rank) for w in args.world]
    results = measure(_rows(args, pairs), args.repeats, reference=False)
    rows = _stamp(weak_rows(results), "weak")
    report(rows, markdown_table(rows, WEAK_COLUMNS), args, WEAK_NOTES.format(cores=cores()))
    if args.png:
        plot_weak(rows, args.png)
    return 0
