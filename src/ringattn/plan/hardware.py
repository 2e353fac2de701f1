"""Hardware descriptions for the planner: peak FLOP/s, memory, link bandwidth, latency.

Every number here is a *model input*, not a measurement, except ``measure_cpu()``. Sources:

* Ring Attention paper (Liu, Zaharia, Abbeel, ICLR 2024), its minimal-block-size table: A100
  312 TFLOP/s with NVLink 300 GB/s or InfiniBand 12.5 GB/s, TPU v4 275 TFLOP/s with 268 GB/s.
  Those are the figures ``plan --paper-table`` reproduces, so they are kept verbatim.
* Vendor datasheets for the rest: H100/H200 SXM 989 TFLOP/s dense bf16 (1979 is the sparse
  figure); NVLink 4 is 900 GB/s per GPU *bidirectional*, i.e. 450 GB/s one way; H200 has
  141 GB. TPU v5e: 197 TFLOP/s bf16 and 16 GB HBM; its ICI one-way neighbour bandwidth is
  our assumption (186 GB/s), scaled like the paper's v4 figure, not a published number.
* Latencies are order-of-magnitude assumptions for one P2P message (NCCL on NVLink ~10 us,
  InfiniBand ~20 us, TPU ICI ~5 us). They only matter for small blocks.
* ``efficiency`` is the fraction of peak an attention kernel achieves (FlashAttention-2 runs
  fwd+bwd at roughly 40-60% of an A100's peak); ``matmul_efficiency`` the same for the dense
  GEMMs of the projections and FFN. Both are assumptions until :func:`calibrate_from` is fed
  measured numbers.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, fields, replace

__all__ = ["HARDWARE", "Hardware", "calibrate_from", "get_hardware", "measure_cpu"]

GB = 1e9
TERA = 1e12


@dataclass(frozen=True)
class Hardware:
    """One device and the link to its ring neighbour, in SI units.

    ``flops``: peak dense bf16 FLOP/s. ``mem_bytes``: device memory. ``link_bw``: one-way
    bytes/s to the next device in the ring (the paper's B). ``latency_s``: fixed cost of one
    P2P message. ``efficiency`` / ``matmul_efficiency``: achieved fraction of ``flops`` for
    attention kernels / dense GEMMs.
    """

    name: str
    flops: float
    mem_bytes: float
    link_bw: float
    latency_s: float = 10e-6
    efficiency: float = 0.5
    matmul_efficiency: float = 0.7
    note: str = ""

    def __post_init__(self) -> None:
        for f in ("flops", "mem_bytes", "link_bw"):
            if not getattr(self, f) > 0:
                raise ValueError(f"Hardware.{f} must be > 0, got {getattr(self, f)!r}")
        for f in ("efficiency", "matmul_efficiency"):
            if not 0 < getattr(self, f) <= 1:
                raise ValueError(f"Hardware.{f} must be in (0, 1], got {getattr(self, f)!r}")
        if self.latency_s < 0:
            raise ValueError(f"Hardware.latency_s must be >= 0, got {self.latency_s!r}")

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("a100-nvlink", 312 * TERA, 80 * GB, 300 * GB, 10e-6, note="paper table"),
        Hardware("a100-ib", 312 * TERA, 80 * GB, 12.5 * GB, 20e-6, note="paper table"),
        Hardware("h100", 989 * TERA, 80 * GB, 450 * GB, 10e-6, note="SXM datasheet, NVLink 4"),
        Hardware("h200", 989 * TERA, 141 * GB, 450 * GB, 10e-6, note="SXM datasheet, NVLink 4"),
        Hardware("tpu-v4", 275 * TERA, 32 * GB, 268 * GB, 5e-6, note="paper table"),
        Hardware("tpu-v5e", 197 * TERA, 16 * GB, 186 * GB, 5e-6, note="ICI bw assumed"),
    )
}


# what ``get_hardware`` may override (``measure_cpu`` measures those not given)
OVERRIDES = ("flops", "mem_bytes", "link_bw", "latency_s", "efficiency", "matmul_efficiency")


def get_hardware(name: str, **over: float | None) -> Hardware:
    """A preset (or ``"cpu"``, measured now) with any of :data:`OVERRIDES` overridden (None:
    keep the preset's value)."""
    bad = sorted(set(over) - set(OVERRIDES))
    if bad:
        raise TypeError(f"get_hardware: unknown overrides {bad}; expected {OVERRIDES}")
    over = {k: v for k, v in over.items() if v is not None}
    if name == "cpu":
        return measure_cpu(**over)
    if name not in HARDWARE:
        raise ValueError(f"hardware {name!r} is unknown; choose one of {sorted(HARDWARE)} or cpu")
    return replace(HARDWARE[name], **over)


# --- the "cpu" preset: measured on the spot -------------------------------------------


def _timed(fn, budget_s: float, max_reps: int = 50) -> float:
    """Best seconds per call of ``fn`` within ``budget_s`` (after one warm-up call)."""
    fn()
    best, t_end, reps = float("inf"), time.perf_counter() + budget_s, 0
    while reps < max_reps and (reps == 0 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return best


def _probe_dtypes() -> tuple:
    import torch

    from ringattn.kernels.fused import cpu_half_is_native

    if cpu_half_is_native():
        return (torch.float32, torch.bfloat16)
    return (torch.float32,)


def _matmul_flops(budget_s: float) -> float:
    """Best of fp32 and bf16 GEMM FLOP/s (bf16 wins on CPUs with bf16 matrix units).

    bf16 is probed only where the CPU has bf16 units: elsewhere it is emulated (~250x slower
    than fp32, seconds per 1024^3 GEMM) and the kernels compute half precision in fp32.
    """
    import torch

    n, rates = 1024, []
    for dt in _probe_dtypes():
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        rates.append(2 * n**3 / _timed(lambda a=a, b=b: a @ b, budget_s / 2))
    return max(rates)


def _attention_flops(budget_s: float) -> float:
    """Achieved FLOP/s of SDPA forward+backward, counted as 3.5x forward FLOPs; bf16 where
    the CPU has bf16 units, else fp32 (what the kernels then compute in).

    3.5 = 1 (forward) + 2.5 (backward recomputes QK^T) -- the same hardware-FLOP convention
    the simulator uses, so ``efficiency = this / peak`` plugs straight in.
    """
    import torch
    import torch.nn.functional as F

    b, h, s, d = 1, 8, 1024, 64
    dt = _probe_dtypes()[-1]
    q, k, v = (torch.randn(b, h, s, d, dtype=dt, requires_grad=True) for _ in "qkv")

    def step() -> None:
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    return 3.5 * 4 * b * h * s * s * d / _timed(step, budget_s, max_reps=10)


def _loopback_link(budget_s: float) -> tuple[float, float]:
    """One-way bytes/s and per-message latency over TCP on 127.0.0.1 (gloo's transport).

    Raw TCP is an optimistic proxy for gloo (which measured ~1-1.7 GB/s per rank here);
    feed the measured gloo numbers to :func:`calibrate_from` for predictions that matter.
    """
    nbytes, small = 16 << 20, 64
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def sink() -> None:
        conn, _ = srv.accept()
        with conn:
            while True:
                hdr = conn.recv(1)
                if not hdr or hdr == b"q":
                    return
                want = nbytes if hdr == b"b" else small
                got = 0
                while got < want:
                    got += len(conn.recv(min(1 << 20, want - got)))
                conn.sendall(b"k")  # ack, so the sender times delivery, not buffering

    th = threading.Thread(target=sink, daemon=True)
    th.start()
    cli = socket.create_connection(("127.0.0.1", port))
    cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    big, tiny = bytes(nbytes), bytes(small)

    def send(tag: bytes, payload: bytes) -> None:
        cli.sendall(tag + payload)
        cli.recv(1)

    try:
        lat = _timed(lambda: send(b"s", tiny), budget_s / 3, max_reps=200) / 2  # RTT/2
        t_big = _timed(lambda: send(b"b", big), 2 * budget_s / 3, max_reps=10)
        cli.sendall(b"q")
    finally:
        cli.close()
        srv.close()
    th.join(timeout=1.0)
    return nbytes / max(t_big - lat, 1e-9), lat


def _memcpy_bw(budget_s: float) -> float:
    """Fallback link estimate: one-way memcpy bytes/s (an upper bound for any transport)."""
    import torch

    src = torch.empty(16 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return src.numel() / _timed(lambda: dst.copy_(src), budget_s, max_reps=20)


def _phys_mem() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * GB  # unknown platform: a modest laptop


def measure_cpu(
    *,
    flops: float | None = None,
    mem_bytes: float | None = None,
    link_bw: float | None = None,
    latency_s: float | None = None,
    efficiency: float | None = None,
    matmul_efficiency: float | None = None,
    budget_s: float = 2.0,
) -> Hardware:
    """This machine as a :class:`Hardware`; measures only what is not given (< ~3 s).

    ``flops`` = best 1024^3 GEMM rate (so ``matmul_efficiency`` defaults to 1.0),
    ``efficiency`` = SDPA fwd+bwd rate / ``flops``, ``link_bw``/``latency_s`` = TCP
    loopback (memcpy if sockets fail), ``mem_bytes`` = physical RAM, shared by all ranks.
    """
    share = budget_s / 3
    if flops is None:
        flops = _matmul_flops(share)
    if efficiency is None:
        efficiency = min(1.0, max(0.01, _attention_flops(share) / flops))
    if link_bw is None or latency_s is None:
        try:
            bw, lat = _loopback_link(share)
        except OSError:
            bw, lat = _memcpy_bw(share), 50e-6
        link_bw = bw if link_bw is None else link_bw
        latency_s = lat if latency_s is None else latency_s
    return Hardware(
        "cpu",
        flops=flops,
        mem_bytes=_phys_mem() if mem_bytes is None else mem_bytes,
        link_bw=link_bw,
        latency_s=latency_s,
        efficiency=efficiency,
        matmul_efficiency=1.0 if matmul_efficiency is None else matmul_efficiency,
        note="measured",
    )


# --- calibration from a benchmark -------------------------------------------------------

_CALIBRATION_KEYS = ("flops", "attn_flops", "matmul_flops", "link_bw", "latency_s", "mem_bytes")


def calibrate_from(measured: dict, base: Hardware | str = "cpu") -> Hardware:
    """A :class:`Hardware` whose rates are the measured ones. All values in SI units.

    Keys (all optional; unknown keys raise):

    * ``flops``: peak FLOP/s to normalise against (default: ``base.flops``).
    * ``attn_flops``: achieved FLOP/s of the attention kernel over forward+backward, counting
      backward as 2.5x forward FLOPs (i.e. ``3.5 * 4*b*h*s_q*s_k*d / seconds`` for a
      non-causal fwd+bwd). Sets ``efficiency = attn_flops / flops``.
    * ``matmul_flops``: achieved dense GEMM FLOP/s. Sets ``matmul_efficiency``.
    * ``link_bw``: one-way bytes/s of one ring hop, e.g. from timing gloo isend/irecv of
      1-64 MiB messages (bytes / (seconds - latency)).
    * ``latency_s``: seconds per ring step for a tiny message (gloo here: ~0.15 ms on 2
      ranks, ~2 ms on 8).
    * ``mem_bytes``: usable device memory.

    ``base`` is a Hardware or a preset name; with the default ``"cpu"`` nothing is measured
    if ``flops`` is given (and everything else not given keeps the preset's values).
    """
    bad = sorted(set(measured) - set(_CALIBRATION_KEYS))
    if bad:
        raise ValueError(f"calibrate_from: unknown keys {bad}; expected {_CALIBRATION_KEYS}")
    m = {k: float(v) for k, v in measured.items()}
    if isinstance(base, str):
        if base == "cpu":
            # Only measure what the caller did not supply (e.g. nothing, for a full dict).
            keep = {k: m[k] for k in ("flops", "link_bw", "latency_s", "mem_bytes") if k in m}
            if "attn_flops" in m:
                keep["efficiency"] = 1.0  # placeholder; recomputed below against flops
            base = measure_cpu(**keep)
        else:
            base = get_hardware(base)
    peak = m.get("flops", base.flops)
    over: dict = {"flops": peak, "note": "calibrated"}
    if "attn_flops" in m:
        over["efficiency"] = min(1.0, m["attn_flops"] / peak)
    if "matmul_flops" in m:
        over["matmul_efficiency"] = min(1.0, m["matmul_flops"] / peak)
    for k in ("link_bw", "latency_s", "mem_bytes"):
        if k in m:
            over[k] = m[k]
    return replace(base, **over)
