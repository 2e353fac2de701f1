"""Worker-side functions for the peer adapters (module level: they pickle by reference):
ring-flash-attn through the stand-in flash_attn, and PyTorch's context_parallel through the CPU
rule, on a spec like tests/dist/cases.py's (causal, zigzag)."""

from __future__ import annotations

import torch.distributed as dist
import torch.nn.functional as F

import ringattn
from ringattn.bench import peer_adapters
from tests.dist.cases import make_inputs
from tests.dist.cases_cp import mesh_for


def rfa_case(spec: dict) -> dict:
    """ring-flash-attn's zigzag_ring_flash_attn_func on this rank's zigzag shards."""
    rank, world = dist.get_rank(), dist.get_world_size()
    fn = peer_adapters.ring_flash_attn_zigzag()
    sh = lambda x: ringattn.shard(x, "zigzag", rank=rank, world_size=world).clone()
    q, k, v, dout = (sh(t) for t in make_inputs(spec))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, causal=True)
    out.backward(dout)
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def torch_cp_case(spec: dict) -> dict:
    """SDPA under context_parallel (its head-tail sharding) with the CPU rule; out and grads
    back in (b, s_local, h, d), the zigzag shard of this rank."""
    mesh = mesh_for((dist.get_world_size(),), ("cp",))
    bufs = [t.transpose(1, 2).contiguous() for t in make_inputs(spec)]  # (b, h, s, d)
    from torch.distributed.tensor.experimental import context_parallel

    with (
        peer_adapters.torch_cp_cpu_rule(spec.get("rotate", "allgather")),
        context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2] * 4),
    ):
        q, k, v = (t.detach().requires_grad_() for t in bufs[:3])
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(bufs[3])
        got = dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)
    return {n: t.transpose(1, 2).contiguous() for n, t in got.items()}


def lucidrains_case(spec: dict) -> dict:
    """ring-attention-pytorch's ring_flash_attn (striped, one bucket per rank) on this rank's
    striped shards, as ``bench peers`` calls it."""
    from ringattn.bench.peers import IMPLS

    rank, world = dist.get_rank(), dist.get_world_size()
    sh = lambda x: ringattn.shard(x, "striped", rank=rank, world_size=world).clone()
    q, k, v, dout = (sh(t) for t in make_inputs(spec))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with IMPLS["ring-attention-pytorch"][1](world) as attn:
        out = attn(q, k, v)
    out.backward(dout)
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)
