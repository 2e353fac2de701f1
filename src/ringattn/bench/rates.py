"""What ``ringattn bench calibrate`` measures on this machine, as plain functions: kernel rates
on one block, the exact kernel calls of a rank's schedule replayed without the ring, ring
exchange times, and how much of a core a rank gets.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from ..comm import Ring
from ..kernels import fused
from ..plan.simulate import BWD_FLOPS_FACTOR
from ..schedule import attention_flops, ring_plan
from .harness import make_inputs, timed


def _kernel_cpu_s(row: dict, n: int, works: list, repeats: int) -> tuple[float, ...]:
    """Least CPU seconds of the CPU fused op's forward, then backward, over ``works`` (each:
    q rows, kv rows, causal, mask) on seeded q, k, v, dout of ``row``'s shape for ``n``
    tokens, (b, h[_kv], n, d). CPU time, not wall: on a shared machine wall time also counts
    waiting for a core."""
    q, k, v, do = (t.transpose(1, 2).contiguous() for t in make_inputs(dict(row, seq=n)))
    scale = row["head_dim"] ** -0.5

    def fwd() -> list:
        return [
            fused.cpu_forward(q[:, :, w.q], k[:, :, w.kv], v[:, :, w.kv], causal=w.causal,
                              scale=scale, mask=w.mask)
            for w in works
        ]  # fmt: skip

    # each block's own (out, lse), so the backward sees realistic softmax statistics
    fwd_res = fwd()

    def bwd() -> None:
        for w, (o, lse) in zip(works, fwd_res):
            fused.cpu_backward(do[:, :, w.q], q[:, :, w.q], k[:, :, w.kv], v[:, :, w.kv], o, lse,
                               causal=w.causal, scale=scale, mask=w.mask)  # fmt: skip

    return tuple(timed(f, repeats)[0]["cpu_s"] for f in (fwd, bwd))  # least of each


def kernel_rates(row: dict, block: int, repeats: int = 2) -> dict:
    """Forward and backward FLOP/s of the CPU fused op on one full (non-causal) block."""
    full = SimpleNamespace(q=slice(None), kv=slice(None), causal=False, mask=None)
    t_fwd, t_bwd = _kernel_cpu_s(row, block, [full], repeats)
    fwd_flops = 4.0 * row["batch"] * row["heads"] * block * block * row["head_dim"]
    bwd_flops = BWD_FLOPS_FACTOR * fwd_flops / t_bwd
    return dict(
        block=block, fwd_s=t_fwd, bwd_s=t_bwd, fwd_flops=fwd_flops / t_fwd, bwd_flops=bwd_flops
    )


def replay_rank(row: dict, rank: int | None = None, repeats: int = 1) -> dict:
    """CPU seconds of exactly the kernel calls ``rank``'s schedule makes (fwd, bwd; None: the
    busiest rank's), without communication, merges or accumulation: between the simulator
    (FLOP-proportional) and the measured ring, so the error of each can be told apart."""
    w, n = row["world"], row["seq"] // row["world"]
    if rank is None:
        flops = attention_flops(row["layout"], w, row["seq"], row["causal"])
        rank = flops.index(max(flops))
    works = [wk for step in ring_plan(row["layout"], row["causal"], rank, w, n) for wk in step]
    t_fwd, t_bwd = _kernel_cpu_s(row, n, works, repeats)
    return dict(fwd_cpu_s=t_fwd, bwd_cpu_s=t_bwd, fwdbwd_cpu_s=t_fwd + t_bwd)


def time_exchanges(sizes: tuple[int, ...], repeats: int, barrier) -> list[float]:
    """Best seconds of one ring exchange (send to rank+1, receive from rank-1) per size."""
    ring = Ring(None)

    def exchange(kv: list) -> dict:
        barrier()
        t0 = time.perf_counter()
        ring.exchange(kv).wait()
        return dict(wall_s=time.perf_counter() - t0)

    out = []
    for n in sizes:
        half = max(n // 8, 1)  # float64 elements per tensor: K and V are n/2 bytes each
        kv = [torch.zeros(half, dtype=torch.float64) for _ in range(2)]
        # the warm-up connects the pair and touches the buffers
        out.append(timed(lambda kv=kv: exchange(kv), repeats, key="wall_s")[0]["wall_s"])
    return out


def probe_share(seconds: float = 0.3) -> float:
    """Fraction of a core one process gets now (CPU / wall time of a busy loop; 1.0: idle)."""
    a = torch.randn(128, 128)
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        a = torch.tanh(a @ a)
    return min(1.0, (time.process_time() - c0) / (time.perf_counter() - t0))
