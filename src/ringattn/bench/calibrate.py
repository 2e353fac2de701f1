"""``ringattn bench calibrate``: measure this machine's kernel and gloo rates, feed them to the
ring simulator, and compare its prediction with ring attention measured at W = 2, 4, 8.

What is measured:

* **kernel**: the CPU fused op ringattn uses (``_scaled_dot_product_flash_attention_for_cpu``
  and its backward, through ``ringattn.kernels.fused``), 1 thread, on one full ``c x c``
  block with ``c = seq / W`` -- the block size of each W. Forward FLOP/s counts
  ``4 b h c^2 d``; backward ``10 b h c^2 d`` (2.5x, the simulator's convention). Timed in
  CPU time (least of a few calls), which other processes on the machine do not inflate.
* **link**: ``ringattn.comm.Ring.exchange`` (the ring's own isend/irecv pair, K and V as two
  tensors) between 2 ranks, for 64 B to 16 MiB, wall time (least of a few): latency = the
  64 B exchange, bandwidth = the fitted slope of the rest (:func:`fit_link`). The same
  exchange with all W ranks at once is reported per W too.
* **ring**: ``ringattn bench attention``'s per-rank timing (best of ``--repeats`` after a
  warm-up) of the same problem in the same launch.

How the simulator is fed (``plan.hardware.calibrate_from``, ``plan.simulate.simulate``): the
forward is simulated with the forward rate, the backward with the backward rate (they differ
on CPU; the simulator has one rate per run). Two predictions per W:

* **shared cores** (compared with wall time): W ranks share ``cores`` cores, so each rank
  gets ``share = min(1, cores / W)`` of a core: kernel rates *and* link bandwidth (gloo's
  TCP copies run on the same cores) are multiplied by ``share``.
* **own core** (compared with the busiest rank's CPU time): ``share = 1``; the simulator's
  compute-only busy time of the busiest rank. CPU time includes gloo's copy threads and the
  LSE merges, not time spent waiting, so this isolates the compute model.
"""

from __future__ import annotations

import argparse

import torch

from ..launch import init_distributed, launch
from ..plan.hardware import calibrate_from
from ..plan.simulate import simulate
from ..schedule import attention_flops
from .attention import summarize, time_rows
from .common import (
    DTYPE_BYTES,
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
from .rates import (
    core_share,
    fit_link,
    kernel_rates,
    probe_share,
    replay_rank,
    time_exchanges,
)

MSG_BYTES = (64, 1 << 20, 4 << 20, 16 << 20)  # per exchange: K and V, half each
__all__ = ["calibration_rows", "core_share", "fit_link", "kernel_rates", "main", "plot"]
__all__ += ["predict", "probe_share", "rel_err", "replay_rank"]


def _rank_main(rows: list[dict], sizes: tuple[int, ...], link_repeats: int, repeats: int):
    import torch.distributed as dist

    rank, world, _ = init_distributed(threads=1, device="cpu")
    link = time_exchanges(sizes, link_repeats, dist.barrier)
    return dict(link_s=link, times=time_rows(rows, repeats, rank, world, dist.barrier))


# --- the model ----------------------------------------------------------------------------


def _hardware(rate: float, link_bw: float, latency_s: float):
    """A calibrated Hardware whose achieved attention rate is ``rate`` (efficiency 1)."""
    return calibrate_from(
        {
            "flops": rate,
            "attn_flops": rate,
            "link_bw": link_bw,
            "latency_s": latency_s,
            "mem_bytes": 1e12,  # memory plays no part in timing
        },
        base="cpu",
    )


def predict(row: dict, rates: dict, latency_s: float, link_bw: float, share: float) -> dict:
    """Simulated fwd, bwd and busiest-rank compute (seconds) of one ring attention layer.

    ``share`` scales kernel rates and link bandwidth (a rank's fraction of a core).
    """
    kw = dict(
        layout=row["layout"],
        causal=row["causal"],
        batch=row["batch"],
        heads=row["heads"],
        kv_heads=row["kv_heads"],
        head_dim=row["head_dim"],
        dtype_bytes=DTYPE_BYTES[row["dtype"]],
        acc_bytes=4,
        record=False,
    )
    w, s = row["world"], row["seq"]
    hw_f = _hardware(rates["fwd_flops"] * share, link_bw * share, latency_s)
    hw_b = _hardware(rates["bwd_flops"] * share, link_bw * share, latency_s)
    fwd = simulate(w, s, hw_f, backward=False, **kw)
    full_b = simulate(w, s, hw_b, backward=True, **kw)
    fwd_b = simulate(w, s, hw_b, backward=False, **kw)  # to take the forward out of full_b
    busy = [
        f + (fb_all - fb_fwd) for f, fb_all, fb_fwd in zip(fwd.busy_s, full_b.busy_s, fwd_b.busy_s)
    ]
    return dict(
        fwd_s=fwd.fwd_s,
        bwd_s=full_b.bwd_s,
        fwdbwd_s=fwd.fwd_s + full_b.bwd_s,
        busy_max_s=max(busy),
        exposed_s=fwd.fwd_exposed_s + full_b.bwd_exposed_s,
    )


def rel_err(pred: float, meas: float) -> float:
    """(predicted - measured) / measured: negative = the model is optimistic."""
    return (pred - meas) / meas


def calibration_rows(
    rows: list[dict],
    measured: dict,
    rates: dict,
    p2p: tuple[float, float],
    n_cores: int,
    probes: dict | None = None,
    replays: dict | None = None,
) -> list[dict]:
    """One row per W: the inputs, the predictions, the measurements and the errors.

    ``probes``: W -> :func:`probe_share` taken just before that W's launch (None: idle).
    ``replays``: W -> :func:`replay_rank` of the busiest rank (None: not measured).
    """
    lat, bw = p2p
    out = []
    for row in rows:
        w = row["world"]
        res, ring_link = measured[w]
        r = rates[w]
        share = core_share(w, n_cores)
        probe = (probes or {}).get(w)
        share_loaded = core_share(w, n_cores, probe)
        shared = predict(row, r, lat, bw, share)
        loaded = predict(row, r, lat, bw, share_loaded)
        own = predict(row, r, lat, bw, 1.0)
        ring_lat, ring_bw = ring_link
        out.append(
            dict(
                row,
                block=row["seq"] // w,
                kernel_fwd_tflops=r["fwd_flops"] / 1e12,
                kernel_bwd_tflops=r["bwd_flops"] / 1e12,
                p2p_latency_s=lat,
                p2p_gbps=bw / 1e9,
                ring_latency_s=ring_lat,
                ring_gbps=ring_bw / 1e9,
                share=share,
                probe=probe,
                share_loaded=share_loaded,
                pred_fwd_s=shared["fwd_s"],
                pred_fwdbwd_s=shared["fwdbwd_s"],
                pred_exposed_s=shared["exposed_s"],
                pred_fwdbwd_loaded_s=loaded["fwdbwd_s"],
                pred_busy_own_core_s=own["busy_max_s"],
                pred_fwdbwd_own_core_s=own["fwdbwd_s"],
                meas_fwd_s=res["fwd_s"],
                meas_fwdbwd_s=res["fwdbwd_s"],
                meas_cpu_max_s=res["fwdbwd_cpu_max_s"],
                meas_wait_s=res["wait_fwdbwd_s"],
                err_fwd=rel_err(shared["fwd_s"], res["fwd_s"]),
                err_fwdbwd=rel_err(shared["fwdbwd_s"], res["fwdbwd_s"]),
                err_fwdbwd_loaded=rel_err(loaded["fwdbwd_s"], res["fwdbwd_s"]),
                err_own_core=rel_err(own["busy_max_s"], res["fwdbwd_cpu_max_s"]),
            )
        )
        rep = (replays or {}).get(w)
        if rep is not None:
            out[-1].update(
                replay_cpu_s=rep["fwdbwd_cpu_s"],
                err_model_vs_replay=rel_err(own["busy_max_s"], rep["fwdbwd_cpu_s"]),
                overhead_vs_replay=res["fwdbwd_cpu_max_s"] / rep["fwdbwd_cpu_s"] - 1.0,
            )
    return out


# --- output -------------------------------------------------------------------------------

INPUT_COLUMNS = [
    ("world", "W", "{}"),
    ("block", "block c", "{}"),
    ("kernel_fwd_tflops", "kernel fwd TF/s", "{:.3f}"),
    ("kernel_bwd_tflops", "kernel bwd TF/s", "{:.3f}"),
    ("p2p_gbps", "P2P GB/s (2 ranks)", "{:.2f}"),
    ("p2p_latency_s", "P2P latency ms", lambda r: f"{r['p2p_latency_s'] * 1e3:.3f}"),
    ("ring_gbps", "ring GB/s (W ranks)", "{:.2f}"),
    ("ring_latency_s", "ring latency ms", lambda r: f"{r['ring_latency_s'] * 1e3:.3f}"),
    ("share", "core share (idle)", "{:.2f}"),
    ("probe", "probe", "{:.2f}"),
    ("share_loaded", "core share (load-aware)", "{:.2f}"),
]

COLUMNS = [
    ("world", "W", "{}"),
    ("seq", "seq", "{}"),
    ("pred_fwd_s", "pred fwd s", "{:.3f}"),
    ("meas_fwd_s", "meas fwd s", "{:.3f}"),
    ("err_fwd", "err", "{:+.0%}"),
    ("pred_fwdbwd_s", "pred f+b s (idle)", "{:.3f}"),
    ("err_fwdbwd", "err", "{:+.0%}"),
    ("pred_fwdbwd_loaded_s", "pred f+b s (load-aware)", "{:.3f}"),
    ("err_fwdbwd_loaded", "err", "{:+.0%}"),
    ("meas_fwdbwd_s", "meas f+b s", "{:.3f}"),
    ("pred_busy_own_core_s", "pred busy/rank s (own core)", "{:.3f}"),
    ("meas_cpu_max_s", "meas CPU/rank s", "{:.3f}"),
    ("err_own_core", "err", "{:+.0%}"),
]

# where the own-core error comes from: the kernels alone, replayed without the ring
SPLIT_COLUMNS = [
    ("world", "W", "{}"),
    ("pred_busy_own_core_s", "simulator busy s", "{:.3f}"),
    ("replay_cpu_s", "same kernel calls replayed s", "{:.3f}"),
    ("err_model_vs_replay", "simulator vs replay", "{:+.0%}"),
    ("meas_cpu_max_s", "ring CPU/rank s", "{:.3f}"),
    ("overhead_vs_replay", "ring overhead over kernels", "{:+.0%}"),
]

NOTES = (
    "Causal {layout}, {dtype}, {h} heads x {d}, seq {seq}. pred: the simulator fed with the "
    "rates above, kernel rates and link bandwidth x a rank's core share. Idle: share = "
    "min(1, {cores}/W). Load-aware: a busy-loop probe just before the launch measured the "
    "fraction p of a core one process got; {cores}/p - 1 other processes are assumed to share "
    "the cores with the W ranks. Both vs the measured wall time of the slowest rank (best of "
    "{repeats}). Own core: the simulator's compute-only busy time of the busiest rank (share "
    "1) vs that rank's CPU time. err = (pred - meas) / meas; negative = model optimistic. "
    "Last table: the busiest rank's kernel calls replayed in one process without the ring "
    "(CPU time): simulator vs replay = the FLOP-proportional kernel model's error (half and "
    "causal blocks run at other rates than a full block); ring overhead = what the ring adds "
    "on top of its kernels (LSE merges, gradient accumulation, gloo's copies)."
)


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    w = [r["world"] for r in rows]
    for ax, (p, m, title) in zip(
        axes,
        (
            ("pred_fwdbwd_s", "meas_fwdbwd_s", "wall time, W ranks on shared cores"),
            ("pred_busy_own_core_s", "meas_cpu_max_s", "busiest rank, own core (CPU time)"),
        ),
    ):
        ax.plot(w, [r[m] for r in rows], "-o", label="measured")
        own = p == "pred_busy_own_core_s"
        ax.plot(
            w,
            [r[p] for r in rows],
            "--s",
            label=f"simulator ({'own core' if own else 'idle machine'})",
        )
        if not own and rows[0].get("pred_fwdbwd_loaded_s") is not None:
            ax.plot(
                w, [r["pred_fwdbwd_loaded_s"] for r in rows], ":^", label="simulator, load-aware"
            )
        if own and rows[0].get("replay_cpu_s") is not None:
            ax.plot(w, [r["replay_cpu_s"] for r in rows], ":x", label="its kernel calls, replayed")
        for x, r in zip(w, rows):
            ax.annotate(
                f"{(r[p] - r[m]) / r[m]:+.0%}",
                (x, r[p]),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(w, [str(x) for x in w])
        ax.set_xlabel("W")
        ax.set_ylabel("fwd+bwd seconds")
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(
        f"simulator vs measured: causal {r0['layout']}, seq {r0['seq']}, {r0['dtype']}, "
        f"{r0['heads']} heads x {r0['head_dim']}",
        fontsize=10,
    )
    save(fig, path, machine_line(r0.get("machine")))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ringattn bench calibrate", description=__doc__)
    p.add_argument("--world", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag", "striped"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed ring runs after a warm-up")
    p.add_argument("--link-repeats", type=int, default=5)
    p.add_argument("--cores", type=int, default=None, help="default: the cores of this process")
    add_output_args(p, "calibrate")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    n_cores = args.cores or cores()
    rows = [
        problem(
            world=w,
            seq=args.seq,
            layout=args.layout,
            causal=True,
            dtype=args.dtype,
            heads=args.heads,
            head_dim=args.head_dim,
        )
        for w in sorted(args.world)
    ]
    rates = {r["world"]: kernel_rates(r, r["seq"] // r["world"]) for r in rows}
    measured, p2p = {}, None
    probes, replays = {}, {}
    for row in rows:
        flops = attention_flops(row["layout"], row["world"], row["seq"], row["causal"])
        replays[row["world"]] = replay_rank(row, flops.index(max(flops)))
    for row in rows:
        w = row["world"]
        probes[w] = probe_share()  # how busy the machine is, just before this launch
        per_rank = launch(_rank_main, w, [row], MSG_BYTES, args.link_repeats, args.repeats)
        link = [max(per_rank[r]["link_s"][i] for r in range(w)) for i in range(len(MSG_BYTES))]
        fitted = fit_link(list(MSG_BYTES), link)
        if w == 2:
            p2p = fitted
        summary = summarize(row, [per_rank[r]["times"][0] for r in range(w)], None)
        measured[w] = (summary, fitted)
    if p2p is None:  # no W = 2 asked for: measure the pair on its own
        per_rank = launch(_rank_main, 2, [], MSG_BYTES, args.link_repeats, args.repeats)
        link = [max(per_rank[r]["link_s"][i] for r in range(2)) for i in range(len(MSG_BYTES))]
        p2p = fit_link(list(MSG_BYTES), link)
    out = calibration_rows(rows, measured, rates, p2p, n_cores, probes, replays)
    m = machine()
    out = [dict(r, bench="calibrate", machine=m, cores=n_cores) for r in out]
    tables = "\n\n".join(
        markdown_table(out, cols) for cols in (INPUT_COLUMNS, COLUMNS, SPLIT_COLUMNS)
    )
    notes = NOTES.format(
        layout=args.layout,
        dtype=args.dtype,
        h=args.heads,
        d=args.head_dim,
        seq=args.seq,
        cores=n_cores,
        repeats=args.repeats,
    )
    report(out, tables, args, notes)
    if args.png:
        plot(out, args.png)
    return 0
