"""``ringattn bench calibrate``: measure this machine's kernel and gloo rates, feed them to the
ring simulator, and compare its prediction with ring attention measured at W = 2, 4, 8
(shared cores vs wall time; own core vs CPU time). Method and results: docs/benchmarks.md.
"""

from __future__ import annotations

import torch

from ..plan.fit import core_share, fit_link, predict, rel_err
from . import harness as h
from . import output
from .attention import summarize, time_rows
from .rates import kernel_rates, probe_share, replay_rank, time_exchanges

MSG_BYTES = (64, 1 << 20, 4 << 20, 16 << 20)  # per exchange: K and V, half each


def _rank(rank: int, world: int, rows: list[dict], link_repeats: int, repeats: int) -> dict:
    link = time_exchanges(MSG_BYTES, link_repeats, h.barrier)
    return dict(link_s=link, times=time_rows(rank, world, rows, repeats))


def _launch(world: int, rows: list[dict], args) -> tuple[list[dict], tuple[float, float]]:
    """One launch of ``world`` ranks: each rank's timings and the fitted (latency, bw)."""
    ranks = h.run_ranks(_rank, world, rows, args.link_repeats, args.repeats, here=False)
    link = [max(r["link_s"][i] for r in ranks) for i in range(len(MSG_BYTES))]
    return ranks, fit_link(list(MSG_BYTES), link)


def calibration_rows(rows, measured, rates, p2p, n_cores, probes=None, replays=None):
    """One row per W: the inputs, the predictions, the measurements and the errors.

    ``measured``: W -> (``summarize``d ring row, its (latency, bw) ring fit); ``rates``: W ->
    :func:`kernel_rates`; ``p2p``: the 2-rank (latency, bw); ``probes``: W ->
    :func:`probe_share` taken just before that W's launch (None: idle); ``replays``: W ->
    :func:`replay_rank` of the busiest rank (None: not measured).
    """
    lat, bw = p2p
    out = []
    for row in rows:
        w = row["world"]
        res, (ring_lat, ring_bw) = measured[w]
        r, probe = rates[w], (probes or {}).get(w)
        share, share_loaded = core_share(w, n_cores), core_share(w, n_cores, probe)
        nbytes = h.DTYPE_BYTES[row["dtype"]]
        shared, loaded, own = (
            predict(row, r, lat, bw, x, nbytes) for x in (share, share_loaded, 1.0)
        )
        out.append(dict(
            row, block=row["seq"] // w, kernel_fwd_tflops=r["fwd_flops"] / 1e12,
            kernel_bwd_tflops=r["bwd_flops"] / 1e12, p2p_latency_s=lat, p2p_gbps=bw / 1e9,
            ring_latency_s=ring_lat, ring_gbps=ring_bw / 1e9, share=share, probe=probe,
            share_loaded=share_loaded, pred_fwd_s=shared["fwd_s"],
            pred_fwdbwd_s=shared["fwdbwd_s"], pred_exposed_s=shared["exposed_s"],
            pred_fwdbwd_loaded_s=loaded["fwdbwd_s"], pred_busy_own_core_s=own["busy_max_s"],
            pred_fwdbwd_own_core_s=own["fwdbwd_s"], meas_fwd_s=res["fwd_s"],
            meas_fwdbwd_s=res["fwdbwd_s"], meas_cpu_max_s=res["fwdbwd_cpu_max_s"],
            meas_wait_s=res["wait_fwdbwd_s"], err_fwd=rel_err(shared["fwd_s"], res["fwd_s"]),
            err_fwdbwd=rel_err(shared["fwdbwd_s"], res["fwdbwd_s"]),
            err_fwdbwd_loaded=rel_err(loaded["fwdbwd_s"], res["fwdbwd_s"]),
            err_own_core=rel_err(own["busy_max_s"], res["fwdbwd_cpu_max_s"]),
        ))  # fmt: skip
        rep = (replays or {}).get(w)
        if rep is not None:
            out[-1].update(
                replay_cpu_s=rep["fwdbwd_cpu_s"],
                err_model_vs_replay=rel_err(own["busy_max_s"], rep["fwdbwd_cpu_s"]),
                overhead_vs_replay=res["fwdbwd_cpu_max_s"] / rep["fwdbwd_cpu_s"] - 1.0,
            )
    return out


# --- output -------------------------------------------------------------------------------


INPUT_COLUMNS = output.columns(
    "world=W; block=block c; kernel_fwd_tflops=kernel fwd TF/s:.3f; "
    "kernel_bwd_tflops=kernel bwd TF/s:.3f; p2p_gbps=P2P GB/s (2 ranks):.2f; "
    "p2p_latency_s=P2P latency ms:.3f/1e-3; ring_gbps=ring GB/s (W ranks):.2f; "
    "ring_latency_s=ring latency ms:.3f/1e-3; share=core share (idle):.2f; probe=probe:.2f; "
    "share_loaded=core share (load-aware):.2f",
)

COLUMNS = output.columns(
    "world=W; seq=seq; pred_fwd_s=pred fwd s:.3f; meas_fwd_s=meas fwd s:.3f; "
    "err_fwd=err:+.0%; pred_fwdbwd_s=pred f+b s (idle):.3f; err_fwdbwd=err:+.0%; "
    "pred_fwdbwd_loaded_s=pred f+b s (load-aware):.3f; err_fwdbwd_loaded=err:+.0%; "
    "meas_fwdbwd_s=meas f+b s:.3f; pred_busy_own_core_s=pred busy/rank s (own core):.3f; "
    "meas_cpu_max_s=meas CPU/rank s:.3f; err_own_core=err:+.0%",
)

# where the own-core error comes from: the kernels alone, replayed without the ring
SPLIT_COLUMNS = output.columns(
    "world=W; pred_busy_own_core_s=simulator busy s:.3f; "
    "replay_cpu_s=same kernel calls replayed s:.3f; "
    "err_model_vs_replay=simulator vs replay:+.0%; meas_cpu_max_s=ring CPU/rank s:.3f; "
    "overhead_vs_replay=ring overhead over kernels:+.0%",
)

NOTES = (
    "Causal {layout}, {dtype}, {heads} heads x {head_dim}, seq {seq}, W ranks on {cores} cores, "
    "best of {repeats}; err = (pred - meas) / meas, negative = the model is optimistic. "
    "Method and columns: docs/benchmarks.md#simulator-vs-measured-calibration."
)


def plot(rows: list[dict], path: str) -> None:
    fig, axes = output.figure(2, figsize=(10, 4))
    w = [r["world"] for r in rows]
    # (prediction, measurement, its error, title, model, a third line if measured)
    panels = (
        ("pred_fwdbwd_s", "meas_fwdbwd_s", "err_fwdbwd", "wall time, W ranks on shared cores",
         "idle machine", ("pred_fwdbwd_loaded_s", ":^", "simulator, load-aware")),
        ("pred_busy_own_core_s", "meas_cpu_max_s", "err_own_core", "busiest rank, own core (CPU "
         "time)", "own core", ("replay_cpu_s", ":x", "its kernel calls, replayed")),
    )  # fmt: skip
    for ax, (p, m, err, title, model, (extra, fmt, label)) in zip(axes, panels):
        ax.plot(w, [r[m] for r in rows], "-o", label="measured")
        ax.plot(w, [r[p] for r in rows], "--s", label=f"simulator ({model})")
        if rows[0].get(extra) is not None:
            ax.plot(w, [r[extra] for r in rows], fmt, label=label)
        for x, r in zip(w, rows):
            ax.annotate(f"{r[err]:+.0%}", (x, r[p]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")  # fmt: skip
        ax.set_ylim(bottom=0)
        output.style(ax, "W", "fwd+bwd seconds", title, logx=2, ticks=w)
    r0 = rows[0]
    output.save(fig, path, rows, f"simulator vs measured: causal {r0['layout']}, seq "
                f"{r0['seq']}, {r0['dtype']}, {r0['heads']} heads x {r0['head_dim']}")  # fmt: skip


def main(argv: list[str]) -> int:
    p = h.parser("bench calibrate", __doc__, out="calibrate", repeats=2)
    h.problem_args(p, world=[2, 4, 8], seq=8192, many=("world",))
    p.add_argument("--link-repeats", type=h.positive, default=5)
    args = h.parse(p, argv, lambda a: [h.problem_of(a, world=w) for w in sorted(a.world)])
    rows = args.problems
    torch.set_num_threads(1)
    n_cores = output.cores()
    rates = {r["world"]: kernel_rates(r, r["seq"] // r["world"]) for r in rows}
    replays = {r["world"]: replay_rank(r) for r in rows}  # the busiest rank's kernel calls
    probes, measured = {}, {}
    for row in rows:
        w = row["world"]
        probes[w] = probe_share()  # how busy the machine is, just before this launch
        ranks, fitted = _launch(w, [row], args)
        measured[w] = (summarize(row, [r["times"][0] for r in ranks], None), fitted)
    # the 2-rank pair's link; measured on its own when no W = 2 was asked for
    p2p = measured[2][1] if 2 in measured else _launch(2, [], args)[1]
    out = calibration_rows(rows, measured, rates, p2p, n_cores, probes, replays)
    out = output.stamp(out, "calibrate", cores=n_cores)
    tables = [INPUT_COLUMNS, COLUMNS, SPLIT_COLUMNS]
    return output.report(out, args, tables, NOTES, plot, cores=n_cores)
