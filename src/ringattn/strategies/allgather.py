"""All-gather context parallelism (the Llama 3 recipe).

Every rank keeps its queries and gathers the K/V of all ranks in ONE all-gather (K and V
packed together, with h_kv heads). The gather is posted first; while it is in flight the rank
attends its queries to its own K/V block (which it already holds), then waits and attends to
the other ranks' blocks, merging through the LSE in fp32. Backward computes the gradients of
every gathered K/V block, posts ONE reduce-scatter (fp32) of them, computes its own block's
gradients while it runs, and adds them to its part of the sum.

Counts per call, W ranks: forward 1 all-gather, each rank sending (W-1) x its K/V block;
backward 1 reduce-scatter of the fp32 dK/dV, (W-1)/W x the gathered size from each rank.
The gathered K/V (W x the local K/V) is saved for backward: the memory the recipe trades for
its two collectives. Which pairs each rank computes comes from
:func:`ringattn.mask_plan.source_plan`, so every layout, causal, documents and windows work,
and blocks with no allowed pair are skipped.
"""

from __future__ import annotations

import functools

import torch

from ..comm import all_gather_async, reduce_scatter_async, world_of
from ..kernels import Kernel
from ..mask_plan import merge_works, source_plan
from ..ring import acc_dtype, attend_, attend_backward_
from ..schedule import BlockWork


@functools.lru_cache(maxsize=256)
def gather_plan(layout: str, world: int, rank: int, n: int, *, causal, cu, window, device):
    """(works on the local K/V block, works on the gathered (W*n)-row K/V without the local
    block), the second with key slices offset into the gathered rows and merged where they
    touch (full attention: two calls, not W-1)."""
    per_src = source_plan(
        layout, world, rank, n, causal=causal, cu=cu, window=window, device=device
    )
    remote = [
        BlockWork(w.q, slice(j * n + w.kv.start, j * n + w.kv.stop), w.causal, w.mask)
        for j, works in enumerate(per_src)
        if j != rank
        for w in works
    ]
    return per_src[rank], tuple(merge_works(remote))


def _bhsd(x):
    return x.transpose(1, 2)  # (b, s, h, d) -> (b, h, s, d) view


def _kv_views(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, 2, b, h_kv, d) packed K/V -> K, V as (b, h_kv, s, d) views."""
    return packed[:, 0].permute(1, 2, 0, 3), packed[:, 1].permute(1, 2, 0, 3)


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, plan, group, kernel):
        local, remote = plan
        b, n, h, _ = q.shape
        # (n, 2, b, h_kv, d): sequence first, so the gather concatenates ranks along it
        packed = torch.stack([k, v]).permute(2, 0, 1, 3, 4).contiguous()
        pending = all_gather_async(packed, group=group, what="all_gather:k/v")
        acc = acc_dtype(q.dtype)
        out = torch.zeros(b, n, h, v.shape[3], dtype=acc, device=q.device)
        lse = torch.full((b, h, n), float("-inf"), dtype=acc, device=q.device)
        q_t, out_t = _bhsd(q), _bhsd(out)
        attend_(out_t, lse, q_t, _bhsd(k), _bhsd(v), local, kernel, scale)  # overlaps
        (full,) = pending.wait()  # (W*n, 2, b, h_kv, d)
        attend_(out_t, lse, q_t, *_kv_views(full), remote, kernel, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, full, out, lse)
        ctx.args = (scale, plan, group, kernel)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, full, out, lse = ctx.saved_tensors
        scale, (local, remote), group, kernel = ctx.args
        acc = acc_dtype(q.dtype)
        q_t, do_t, o_t = _bhsd(q), _bhsd(dout), _bhsd(out)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        # gradients of every gathered block, fp32, in the gathered (W*n, 2, b, h_kv, d) layout
        dfull = torch.zeros(full.shape, dtype=acc, device=q.device)
        kf, vf = _kv_views(full)
        dkf, dvf = _kv_views(dfull)
        args = (do_t, q_t)
        attend_backward_(_bhsd(dq), dkf, dvf, *args, kf, vf, o_t, lse, remote, kernel, scale)
        pending = reduce_scatter_async(dfull, group=group, what="reduce_scatter:dk/dv")
        # our own block's gradients stay here: computed while the reduce-scatter runs
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        k_t, v_t = _bhsd(k), _bhsd(v)
        attend_backward_(
            _bhsd(dq), _bhsd(dk), _bhsd(dv), *args, k_t, v_t, o_t, lse, local, kernel, scale
        )
        (mine,) = pending.wait()  # (n, 2, b, h_kv, d): sum over ranks of our block's grads
        dk += mine[:, 0].permute(1, 0, 2, 3)  # one rank: dfull itself, zeros
        dv += mine[:, 1].permute(1, 0, 2, 3)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def allgather_attention(
    q, k, v, *, scale, causal, layout, cu, window, kernel: Kernel, group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (b, n, h, d), k/v (b, n, h_kv, d) sharded by ``layout`` over ``group`` (inputs
    already validated) -> out (b, n, h, d), lse (b, h, n) fp32."""
    rank, world = world_of(group)
    n, dev = q.shape[1], str(q.device)
    plan = gather_plan(layout, world, rank, n, causal=causal, cu=cu, window=window, device=dev)
    return _AllGatherAttention.apply(q, k, v, scale, plan, group, kernel)
