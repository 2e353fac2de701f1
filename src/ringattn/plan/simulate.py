"""A discrete-event model of one layer's ring attention, forward and backward, on W devices.

Each rank r runs W ring steps. At step i it holds the K/V block of rank ``j = (r - i) % W``
and computes the part of ``q_r x kv_j`` its layout's causal mask leaves (a work *fraction*
of a full ``c x c`` block, c = seq / W). Meanwhile it forwards that K/V block to rank r+1.
The dependencies, per rank and step (all times in seconds):

* a K/V transfer ``r-1 -> r`` starts once rank r-1 holds the block (its step start) and rank
  r has posted the receive (its own step start: the buffer it lands in is the one just used);
* a rank starts step i+1 when its step-i compute is done *and* the next block has arrived:
  ``start' = max(start + compute, max(start_prev_rank, start) + transfer)``. A send is never
  delayed by the link still carrying the previous message: that message had to arrive before
  the receiver could start the step, which already bounds the new send's start.
* backward (FlashAttention-style, 2.5x forward FLOPs: QK^T is recomputed) also circulates
  the dK/dV accumulators in fp32. Rank r adds its share to the accumulator of block j and
  sends it on only *after* its compute, so this transfer overlaps the *next* step. The link
  is FIFO: K/V for the next step queue behind the previous accumulator. After the last step
  one more hop returns each accumulator to its owner; nothing hides that hop.

Per step that is a handful of vectorised max/add operations over all ranks (torch float64
tensors, torch being this package's one dependency), so W = 4096 runs in well under a second.

Packed documents (``cu_seqlens``): the work of rank r at step i is no longer one of three
fractions; it is read from the rank's real ring plan (:func:`ringattn.mask_plan.ring_mask_plan`,
the pairs its kernels compute, a masked box counted whole), and the ring runs only the T <= W
steps that plan has. Any layout works, "packed" included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ringattn.plan.hardware import Hardware
from ringattn.schedule import balance

__all__ = [
    "LAYOUTS",
    "SimResult",
    "closed_form_steps",
    "mask_matrix",
    "simulate",
    "to_png",
    "work_fractions",
]

LAYOUTS = ("contiguous", "zigzag", "striped")
BWD_FLOPS_FACTOR = 2.5  # backward recomputes QK^T and adds dV, dP, dQ, dK: 10 vs 4 per pair
TIMELINE_MAX_WORLD = 16  # the PNG draws one row per rank


def work_fractions(layout: str, causal: bool, block: int) -> tuple[float, float, float]:
    """Pairs computed over ``block**2`` at (step 0, source rank j < r, source rank j > r).

    These three numbers are the whole causal schedule (``ringattn.schedule`` enumerates the
    same blocks; a test checks they agree):

    * contiguous: diagonal triangle, full block, skipped;
    * zigzag: triangle over the two local chunks, half (all q x first half of kv), half
      (second half of q x all kv) -- equal work at every step;
    * striped: triangle at step 0 and from earlier ranks, triangle minus its diagonal from
      later ranks -- equal work up to 1/c.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is unknown; choose one of {LAYOUTS}")
    if not causal:
        return 1.0, 1.0, 1.0
    c = block
    tri = (c + 1) / (2 * c)  # c(c+1)/2 pairs
    if layout == "contiguous":
        return tri, 1.0, 0.0
    if layout == "zigzag":
        return tri, 0.5, 0.5
    return tri, tri, (c - 1) / (2 * c)


def closed_form_steps(world: int, fracs: tuple[float, float, float]):
    """Fraction of a c x c block rank r computes at ring step i, as ``step(i) -> (W,)``, and
    the per-rank total (W,). At step i > 0 ranks r >= i hold K/V from an earlier rank
    (j = r - i), ranks r < i from a later one. Rows are built on demand: W = 4096 would
    otherwise need a W x W matrix."""
    ranks = torch.arange(world, dtype=torch.float64)
    early, late = (torch.full((world,), f, dtype=torch.float64) for f in fracs[1:])

    def step(i: int) -> torch.Tensor:
        if i == 0:
            return torch.full((world,), fracs[0], dtype=torch.float64)
        return torch.where(ranks < i, late, early)  # float64: scalars would give float32

    return step, fracs[0] + ranks * fracs[1] + (world - 1 - ranks) * fracs[2]


def mask_matrix(layout: str, world: int, seq: int, *, causal: bool, cu_seqlens) -> tuple:
    """((T steps, W ranks) fractions of a c x c block each rank's kernels compute under the
    real mask, useful pairs in total), from the ring plans of :mod:`ringattn.mask_plan`."""
    from ringattn.mask_plan import plan_flops, ring_mask_plan

    c, cu = seq // world, tuple(int(x) for x in cu_seqlens)
    plans = [ring_mask_plan(layout, world, r, c, causal=causal, cu=cu) for r in range(world)]
    f = torch.tensor(
        [
            [plan_flops((p[i],), c, c, allowed=False) / 4 for p in plans]
            for i in range(len(plans[0]))
        ],
        dtype=torch.float64,
    )
    useful = sum(plan_flops(p, c, c) for p in plans) / 4
    return f / (c * c), useful


@dataclass
class SimResult:
    """Times in seconds for one attention layer; ``busy_s`` is compute per rank (fwd+bwd)."""

    world: int
    seq: int
    block: int
    layout: str
    causal: bool
    hardware: str
    fwd_s: float
    bwd_s: float
    fwd_exposed_s: float
    bwd_exposed_s: float
    block_compute_s: float  # one full c x c block, forward
    block_transfer_s: float  # one K/V block, latency included
    acc_transfer_s: float  # one fp32 dK/dV accumulator (0 without backward)
    busy_s: list[float]
    model_flops: float
    mfu: float
    timeline: list[tuple] | None = field(default=None, repr=False)

    @property
    def total_s(self) -> float:
        return self.fwd_s + self.bwd_s

    @property
    def exposed_comm_s(self) -> float:
        """Critical-path time not explained by the busiest rank's compute."""
        return self.fwd_exposed_s + self.bwd_exposed_s

    @property
    def imbalance(self) -> float:
        """max / min busy time over ranks (1 = perfectly balanced)."""
        return balance(self.busy_s)["max_over_min"]

    def to_dict(self, per_rank: bool | None = None) -> dict:
        """JSON-ready summary; per-rank busy times only for small worlds unless asked."""
        d = {
            k: getattr(self, k)
            for k in (
                "world",
                "seq",
                "block",
                "layout",
                "causal",
                "hardware",
                "fwd_s",
                "bwd_s",
                "total_s",
                "fwd_exposed_s",
                "bwd_exposed_s",
                "exposed_comm_s",
                "block_compute_s",
                "block_transfer_s",
                "acc_transfer_s",
                "model_flops",
                "mfu",
            )
        }
        d["busy_min_s"], d["busy_max_s"] = min(self.busy_s), max(self.busy_s)
        d["imbalance"] = self.imbalance if math.isfinite(self.imbalance) else None
        if per_rank if per_rank is not None else self.world <= 64:
            d["busy_s"] = list(self.busy_s)
        return d


def _ring_pass(
    n_steps: int,
    world: int,
    t_step,
    x_kv: float,
    x_acc: float | None,
    events: list | None,
    t0: float,
    tag: str,
) -> torch.Tensor:
    """Finish time per rank of one pass; ``x_acc`` None means forward (no accumulators).

    ``t_step(i)`` -> (W,): compute seconds of every rank at ring step i < ``n_steps``.
    """
    start = torch.zeros(world, dtype=torch.float64)
    acc_arr = torch.zeros(world, dtype=torch.float64)  # when this step's dK/dV reached r
    for i in range(n_steps):
        busy = start + t_step(i)
        done = busy if x_acc is None else torch.maximum(busy, acc_arr)
        last = i == n_steps - 1
        if not last:
            send = torch.maximum(start, start.roll(1))  # r-1 holds it, r has posted recv
            if x_acc is not None:
                send = torch.maximum(send, acc_arr)  # FIFO link: after the last dK/dV
            kv_arr = send + x_kv
        if x_acc is not None:
            link_free = acc_arr if last else kv_arr
            acc_send = torch.maximum(done.roll(1), link_free)
            acc_arr = acc_send + x_acc
        if events is not None:
            _record(events, tag, i, t0, start, busy, None if last else (send, kv_arr))
            if x_acc is not None:
                _record(events, tag + "-acc", i, t0, None, None, (acc_send, acc_arr))
        if not last:
            start = torch.maximum(done, kv_arr)
    return done if x_acc is None else torch.maximum(done, acc_arr)


def _record(events: list, tag: str, step: int, t0: float, start, busy, xfer) -> None:
    """Append (rank, lane, tag, step, t_start, t_end) rows; transfers belong to the receiver."""
    if start is not None:
        for r, (a, b) in enumerate(zip(start.tolist(), busy.tolist())):
            if b > a:
                events.append((r, "compute", tag, step, t0 + a, t0 + b))
    if xfer is not None:
        for r, (a, b) in enumerate(zip(xfer[0].tolist(), xfer[1].tolist())):
            events.append((r, "comm", tag, step, t0 + a, t0 + b))


def simulate(
    world: int,
    seq: int,
    hw: Hardware,
    *,
    layout: str = "zigzag",
    causal: bool = True,
    batch: int = 1,
    heads: int = 32,
    kv_heads: int | None = None,
    head_dim: int = 128,
    dtype_bytes: int = 2,
    acc_bytes: int = 4,
    backward: bool = True,
    record: bool | None = None,
    cu_seqlens=None,
) -> SimResult:
    """Simulate one attention layer over a ring of ``world`` devices of type ``hw``.

    ``seq`` is the global sequence (split into ``world`` blocks of ``c = seq // world``;
    zigzag needs ``seq % (2 * world) == 0``); ``heads``/``kv_heads``/``head_dim`` are the
    per-device attention shape (after any tensor parallelism). Achieved throughput is
    ``hw.flops * hw.efficiency``; a transfer costs ``hw.latency_s + bytes / hw.link_bw``.
    ``record`` (default: ``world <= 16``) keeps a timeline for :func:`to_png`.
    ``cu_seqlens`` (global document boundaries): per-step work from the real mask, any layout
    including "packed" (see the module docstring).
    """
    if world < 1 or seq < world or seq % world:
        raise ValueError(f"seq ({seq}) must be a positive multiple of world ({world})")
    if layout == "zigzag" and causal and seq % (2 * world):
        raise ValueError(f"zigzag needs seq % (2 * world) == 0, got seq={seq}, world={world}")
    kv_heads = kv_heads or heads
    c = seq // world
    rate = hw.flops * hw.efficiency
    block_flops = 4.0 * batch * heads * head_dim * c * c  # QK^T and PV, 2 FLOPs per MAC
    t_block = block_flops / rate
    if cu_seqlens is None:
        n_steps = world
        frac, frac_total = closed_form_steps(world, work_fractions(layout, causal, c))
        pairs = seq * (seq + 1) / 2 if causal else float(seq) * seq
    else:
        mat, pairs = mask_matrix(layout, world, seq, causal=causal, cu_seqlens=cu_seqlens)
        n_steps, frac, frac_total = mat.shape[0], mat.__getitem__, mat.sum(0)
    kv_elems = 2 * batch * c * kv_heads * head_dim  # K and V
    # One device has no neighbour, one step (no pair crosses a rank): nothing to send.
    ring = world > 1 and n_steps > 1
    x_kv = hw.latency_s + kv_elems * dtype_bytes / hw.link_bw if ring else 0.0
    x_acc = hw.latency_s + kv_elems * acc_bytes / hw.link_bw if ring and backward else 0.0

    if record is None:
        record = world <= TIMELINE_MAX_WORLD
    events: list | None = [] if record else None

    def t_fwd(i: int) -> torch.Tensor:
        return frac(i) * t_block

    def t_bwd(i: int) -> torch.Tensor:
        return frac(i) * (BWD_FLOPS_FACTOR * t_block)

    fwd_finish = _ring_pass(n_steps, world, t_fwd, x_kv, None, events, 0.0, "fwd")
    fwd_s = float(fwd_finish.max())
    fwd_busy = frac_total * t_block
    busy = fwd_busy
    bwd_s = bwd_exposed = 0.0
    if backward:
        bwd_finish = _ring_pass(n_steps, world, t_bwd, x_kv, x_acc, events, fwd_s, "bwd")
        bwd_s = float(bwd_finish.max())
        bwd_busy = frac_total * (BWD_FLOPS_FACTOR * t_block)
        bwd_exposed = max(0.0, bwd_s - float(bwd_busy.max()))
        busy = fwd_busy + bwd_busy

    # Useful FLOPs only: every layout computes the same allowed pairs in total (S(S+1)/2
    # causal, fewer under a document mask); backward counts as 2x forward (the recomputation
    # is not model work).
    model_flops = 4.0 * batch * heads * head_dim * pairs * (3 if backward else 1)
    total = fwd_s + bwd_s
    return SimResult(
        world=world,
        seq=seq,
        block=c,
        layout=layout,
        causal=causal,
        hardware=hw.name,
        fwd_s=fwd_s,
        bwd_s=bwd_s,
        fwd_exposed_s=max(0.0, fwd_s - float(fwd_busy.max())),
        bwd_exposed_s=bwd_exposed,
        block_compute_s=t_block,
        block_transfer_s=x_kv,
        acc_transfer_s=x_acc,
        busy_s=busy.tolist(),
        model_flops=model_flops,
        mfu=model_flops / (total * world * hw.flops) if total > 0 else 0.0,
        timeline=events,
    )


_COLORS = {
    ("compute", "fwd"): "tab:blue",
    ("compute", "bwd"): "tab:orange",
    ("comm", "fwd"): "tab:gray",
    ("comm", "bwd"): "tab:gray",
    ("comm", "bwd-acc"): "tab:red",
}


def to_png(result: SimResult, path: str) -> None:
    """Draw the timeline: per rank, a compute lane (top) and an incoming-transfer lane."""
    if result.timeline is None:
        raise ValueError("no timeline: simulate(..., record=True), world <= 16")
    from matplotlib.figure import Figure  # lazy: plotting is optional (the bench extra)
    from matplotlib.patches import Patch

    w = result.world
    fig = Figure(figsize=(11, 1.2 + 0.5 * w))
    ax = fig.add_subplot()
    bars: dict[tuple, list] = {}
    for r, lane, tag, _step, a, b in result.timeline:
        bars.setdefault((r, lane, tag), []).append((a * 1e3, (b - a) * 1e3))
    for (r, lane, tag), spans in bars.items():
        # Compute above the rank's centre line, transfers below; dK/dV under K/V.
        y, h = (r - 0.4, 0.4) if lane == "compute" else (r + 0.05, 0.16)
        if tag == "bwd-acc":
            y += 0.18
        # White edges separate back-to-back steps.
        ax.broken_barh(spans, (y, h), facecolors=_COLORS[(lane, tag)], edgecolor="white", lw=0.6)
    ax.set_yticks(range(w), [f"rank {r}" for r in range(w)])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.axvline(result.fwd_s * 1e3, color="k", lw=0.5, ls="--")
    ax.set_title(
        f"ring attention, W={w}, seq={result.seq}, {result.layout}"
        f"{' causal' if result.causal else ''}, {result.hardware}: "
        f"{result.total_s * 1e3:.3g} ms, exposed comm {result.exposed_comm_s * 1e3:.3g} ms, "
        f"MFU {result.mfu:.1%}",
        fontsize=9,
    )
    names = [
        ("tab:blue", "forward compute"),
        ("tab:orange", "backward compute"),
        ("tab:gray", "K/V transfer in"),
        ("tab:red", "dK/dV transfer in"),
    ]
    ax.legend(
        handles=[Patch(color=c, label=n) for c, n in names],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.1 - 0.4 / w),
        ncol=4,
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
