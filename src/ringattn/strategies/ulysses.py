"""Ulysses context parallelism (DeepSpeed-Ulysses), and the Ulysses x ring core of hybrid.

One all-to-all turns sequence shards into head shards: each of the U ranks sends head group
u' of its n tokens to rank u' and receives head group u of all U*n tokens. The rank then
attends with h/U query heads over the whole sequence and a second all-to-all turns the output
back into sequence shards. q, k and v travel in ONE all-to-all (packed along the head axis).

Layout: the ranks hold ``layout`` shards, so the gathered sequence is in the layout's
rank-major order; it is re-permuted to increasing positions (one local index_select, the
identity for "contiguous"), which makes causal, documents and windows plain position masks.

GQA: the heads must split evenly over U ranks, for q and for k/v. With h_kv not a multiple
of U, each K/V head is repeated just enough, to lcm(h_kv, U) heads, before the all-to-all
(h_kv = 2, U = 4: twice; h_kv = 2, U = 3: three times). That always works when h % U == 0,
which is the one requirement.

Hybrid (USP): the same code with a ring of R ranks after the all-to-all. Ring rank r then
holds the sorted positions of the U shards of cp ranks r*U .. r*U+U-1 and the K/V heads of
its head group go around the ring (:func:`ringattn.mask_plan.ring_mask_plan` with
``group=U``).

Counts per call: forward 2 all-to-all (+1 for the lse with ``return_lse``), backward 2;
each all-to-all sends (U-1)/U of its input from every rank.
"""

from __future__ import annotations

import functools
import math

import torch

from ..balance import PACKED
from ..comm import Ring, all_to_all, world_of
from ..kernels import Kernel
from ..layouts import local_indices
from ..mask_plan import MASK_TILE, ring_mask_plan
from ..ring import ring_pass


def kv_repeats(h_kv: int, ulysses: int) -> int:
    """How many times each K/V head is repeated so h_kv * r splits over ``ulysses`` ranks."""
    return ulysses // math.gcd(h_kv, ulysses)


@functools.lru_cache(maxsize=256)
def sort_orders(
    layout: str, world: int, ring_rank: int, ulysses: int, n: int, device: str, cu=None
):
    """(order, inverse) on ``device``: the permutation sorting the concatenated shards of
    one Ulysses group by position and its inverse (long (U*n,)), or None when they already
    are sorted. Cached per device, so a call copies nothing from the host. ``cu``: the
    documents (tuple), which layout "packed" is built from."""
    seq = world * n
    cat = torch.cat(
        [
            local_indices(seq, layout, ring_rank * ulysses + u, world, cu_seqlens=cu)
            for u in range(ulysses)
        ]
    )
    order = torch.argsort(cat)
    if torch.equal(order, torch.arange(cat.numel())):
        return None
    return order.to(device), torch.argsort(order).to(device)


def usp_attention(
    q,
    k,
    v,
    *,
    scale: float,
    causal: bool,
    layout: str,
    cu,
    window,
    kernel: Kernel,
    ulysses_group,
    ring: Ring,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ulysses over ``ulysses_group`` (U ranks), then a ring over ``ring`` (R ranks).

    q (b, n, h, d), k/v (b, n, h_kv, d): the ``layout`` shard of cp rank r*U + u over U*R
    ranks (validated: h % U == 0). Returns out (b, n, h, d) and lse (b, h, n) fp32 (the lse
    is only brought back when ``need_lse``; otherwise it is the head-sharded one).
    """
    _, U = world_of(ulysses_group)
    b, n, h, d = q.shape
    if U > 1:
        rep = kv_repeats(k.shape[2], U)
        if rep > 1:  # GQA with h_kv not a multiple of U: repeat K/V heads just enough
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        hq, hkv = h // U, k.shape[2] // U
        # group the heads by destination rank, q|k|v side by side: (b, n, U*(hq+2*hkv), d)
        parts = [x.reshape(b, n, U, -1, d) for x in (q, k, v)]
        packed = torch.cat(parts, dim=3).flatten(2, 3)
        x = all_to_all(packed, scatter_dim=2, gather_dim=1, group=ulysses_group)
        docs = cu if layout == PACKED else None  # only "packed" depends on them: cache hits
        orders = sort_orders(layout, U * ring.world, ring.rank, U, n, str(q.device), docs)
        if orders is not None:  # rank-major layout order -> increasing positions
            x = x.index_select(1, orders[0])
        q, k, v = (t.contiguous() for t in x.split([hq, hkv, hkv], dim=2))
    plan = ring_mask_plan(
        layout,
        ring.world,
        ring.rank,
        U * n,
        causal=causal,
        cu=cu,
        window=window,
        group=U,
        tile=min(n, MASK_TILE),  # skip what the ring would skip, at the ring's block size
        device=str(q.device),
    )
    out, lse = ring_pass(q, k, v, scale=scale, plan=plan, ring=ring, kernel=kernel)
    if U == 1:
        return out, lse
    if orders is not None:
        inv = orders[1]
        out, lse = out.index_select(1, inv), lse.index_select(2, inv)
    out = all_to_all(out, scatter_dim=1, gather_dim=2, group=ulysses_group)  # (b, n, h, d)
    if need_lse:
        lse = all_to_all(lse, scatter_dim=2, gather_dim=1, group=ulysses_group)  # (b, h, n)
    return out, lse


def ulysses_attention(q, k, v, *, group=None, **kw):
    """Ulysses over ``group``: inputs already validated (h % W == 0). ``kw``: the options
    of :func:`usp_attention`."""
    return usp_attention(q, k, v, ulysses_group=group, ring=Ring.local(), **kw)
