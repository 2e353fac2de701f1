"""Functions the worker ranks run (module level, so they pickle by reference)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

import ringattn
from ringattn.kernels import Kernel, blockwise_kernel, fused
from ringattn.validate import clear_checked

DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}


def make_inputs(spec: dict):
    """Global q, k, v, dout (b, s, h, d) from a seed, rounded to spec['dtype']."""
    g = torch.Generator().manual_seed(spec.get("seed", 0))
    b, s, h, hk, d = spec["b"], spec["s"], spec["h"], spec["hk"], spec["d"]
    dt = DTYPES[spec["dtype"]]
    q = torch.randn(b, s, h, d, generator=g) * spec.get("q_scale", 1.0)
    k = torch.randn(b, s, hk, d, generator=g)
    v = torch.randn(b, s, hk, d, generator=g)
    dout = torch.randn(b, s, h, d, generator=g)
    return [t.to(dt) for t in (q, k, v, dout)]


_BWD_DTYPES: list[str] = []  # what the "spy" kernel's backward was given, this case


def _spy_backward(dout, q, *args, **kw):
    _BWD_DTYPES.append(str(q.dtype).replace("torch.", ""))
    return fused.cpu_backward(dout, q, *args, **kw)


def _kernel(spec):
    kern = spec.get("kernel", "auto")
    if kern.startswith("blockwise:"):
        return blockwise_kernel(int(kern.split(":")[1]))
    if kern == "spy":  # the CPU op, recording the dtype each block backward runs in
        return Kernel("spy", fused.cpu_forward, _spy_backward)
    return kern


@contextlib.contextmanager
def _half_native(native: bool | None):
    """Run the CPU op as on a CPU with (True) or without (False) bf16 units, whatever this
    CPU has; None: as it is."""
    saved = fused.cpu_half_is_native
    if native is not None:
        fused.cpu_half_is_native = lambda: native
    try:
        yield
    finally:
        fused.cpu_half_is_native = saved


def _noncontig(x: torch.Tensor) -> torch.Tensor:
    # same values, strides of a (b, h, s, d) tensor seen through transpose
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def ring_case(spec: dict) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    clear_checked()  # every rank: this case's first call runs its input check (counted)
    q, k, v, dout = make_inputs(spec)
    layout = spec["layout"]
    sh = lambda x: ringattn.shard(x, layout, rank=rank, world_size=world).clone()
    ql, kl, vl, dl = (sh(t) for t in (q, k, v, dout))
    if spec.get("noncontig"):
        ql, kl, vl = (_noncontig(t) for t in (ql, kl, vl))
    ql, kl, vl = (t.requires_grad_() for t in (ql, kl, vl))
    _BWD_DTYPES.clear()
    with _half_native(spec.get("half_native")), ringattn.count_comm() as counter:
        out, lse = ringattn.ring_attention(
            ql,
            kl,
            vl,
            causal=spec["causal"],
            softmax_scale=spec.get("scale"),
            layout=layout,
            return_lse=True,
            kernel=_kernel(spec),
            grad_precision=spec.get("grad_precision", "auto"),
        )
        fwd_calls = dict(counter.calls)
        out.backward(dl)
    return {
        "out": out.detach(),
        "lse": lse,
        "dq": ql.grad,
        "dk": kl.grad,
        "dv": vl.grad,
        "fwd_calls": fwd_calls,
        "calls": dict(counter.calls),
        "bytes": dict(counter.bytes),
        "out_dtype": out.dtype,
        "out_shape": tuple(out.shape),
        "bwd_dtypes": sorted(set(_BWD_DTYPES)),
    }


def raise_case(spec: dict):
    """Calls ring_attention with inputs that some ranks get wrong (spec['bad'])."""
    rank = dist.get_rank()
    clear_checked()
    s_local = spec["s_local"] + (1 if rank in spec.get("longer_on", ()) else 0)
    hk = spec.get("hk", 2)
    if rank in spec.get("bad_heads_on", ()):
        hk = 3
    q = torch.randn(1, s_local, 4, 8)
    k = torch.randn(1, s_local, hk, 8)
    return ringattn.ring_attention(
        q, k, k.clone(), causal=True, layout=spec.get("layout", "zigzag")
    )


def die_case(spec: dict):
    """Rank spec['victim'] raises before its first transfer; the others must not hang."""
    rank = dist.get_rank()
    q = torch.randn(1, 8, 2, 8)
    if rank == spec["victim"]:
        # a rank failing after the collective checks, mid-forward, from user code
        import ringattn.ring as ring_mod

        orig = ring_mod.ring_forward

        def boom(*a, **kw):
            raise RuntimeError("simulated failure on this rank")

        ring_mod.ring_forward = boom
        try:
            return ringattn.ring_attention(q, q, q, causal=True)
        finally:
            ring_mod.ring_forward = orig
    return ringattn.ring_attention(q, q, q, causal=True)


def barrier_case(spec: dict) -> int:
    dist.barrier()
    return dist.get_rank()


def unshard_case(spec: dict) -> dict:
    """unshard restores global order and its backward sums every rank's gradient."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, spec["s"], 3, generator=g)
    w = torch.randn(2, spec["s"], 3, generator=g)  # same weights everywhere
    cu = spec.get("cu")  # the documents layout "packed" is built from
    local = ringattn.shard(x, spec["layout"], rank=rank, world_size=world, cu_seqlens=cu)
    local = local.clone().requires_grad_()
    full = ringattn.unshard(local, spec["layout"], cu_seqlens=cu)
    ((full * w).sum() * (rank + 1)).backward()  # rank-dependent loss: grads must be summed
    return {"full": full.detach(), "grad": local.grad, "x": x, "w": w}


def repeat_case(spec: dict) -> dict:
    """ring_attention twice with one signature: what each call sends (torch.distributed
    calls by function, and ringattn's own count)."""
    from ringattn.dist_trace import trace_dist

    clear_checked()
    q = torch.randn(1, 8, 4, 8, requires_grad=True)
    per_call = []
    for _ in range(2):
        with trace_dist() as trace, ringattn.count_comm() as counter:
            out = ringattn.ring_attention(q, q, q, causal=True, layout="zigzag")
            out.sum().backward()
        per_call.append((dict(trace.calls), trace.collectives, dict(counter.calls)))
    return per_call


def late_mismatch_case(spec: dict):
    """A signature agreed by every rank, then rank 1 alone calls with new inputs."""
    clear_checked()
    q = torch.randn(1, 8, 2, 8)
    ringattn.ring_attention(q, q, q, causal=True)  # agreed and cached on every rank
    k = q
    if dist.get_rank() == 1 and spec["change"] == "length":
        q = k = torch.randn(1, 10, 2, 8)  # a valid shape, never agreed
    if dist.get_rank() == 1 and spec["change"] == "heads":
        k = torch.randn(1, 8, 3, 8)  # fails the local checks: 2 heads are not a multiple of 3
    return ringattn.ring_attention(q, k, k, causal=True)
