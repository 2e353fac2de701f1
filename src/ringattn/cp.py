"""``context_parallel_attention``: one entry point for the ring and its family.

Every strategy takes the same shards and returns the same result as :func:`ring_attention`;
they differ in what travels (see docs/strategies.md):

- "ring": K/V go around the ring, W-1 hops (fewer with a window), overlapped with compute.
- "allgather": one all-gather of K/V forward, one reduce-scatter of dK/dV backward.
- "ulysses": all-to-alls turn sequence shards into head shards and back (h % W == 0).
- "hybrid": Ulysses inside mesh["ulysses"], ring across mesh["ring"].

Masks are positions-based and global: ``causal``, packed documents (``cu_seqlens``) and a
sliding ``window``; each strategy skips the blocks they rule out (:mod:`ringattn.mask_plan`).

Checks: configuration that is the same on every rank by construction (strategy, mesh) raises
at once; everything that depends on the inputs is checked locally, then agreed across ranks
(:func:`ringattn.validate.agree`) so that one bad rank makes every rank raise, not hang.
"""

from __future__ import annotations

import operator

import torch

from .balance import PACKED
from .comm import Ring, world_of
from .kernels import Kernel, get_kernel
from .layouts import ALL_LAYOUTS
from .mask_plan import ring_mask_plan
from .ring import ring_pass
from .strategies import allgather_attention, hybrid_attention, ulysses_attention
from .strategies.hybrid import mesh_groups
from .validate import QKV_FIELDS, agree, check_layout_len, check_qkv, dtype_code

STRATEGIES = ("ring", "allgather", "ulysses", "hybrid")
# what the ranks agree on (validate.agree), in the order of ``meta`` below
_FIELDS = (*QKV_FIELDS, "layout", "causal", "strategy", "window left", "window right",
           "cu_seqlens length", "cu_seqlens checksum")  # fmt: skip


def check_cu_seqlens(cu_seqlens, seq_len: int, *, name: str) -> tuple[int, ...] | None:
    """``cu_seqlens`` (n_docs + 1,) int32, global -> a tuple of ints (hashable, on the host)."""
    if cu_seqlens is None:
        return None
    cu = cu_seqlens
    if (
        not isinstance(cu, torch.Tensor)
        or cu.dim() != 1
        or cu.dtype.is_floating_point
        or cu.dtype.is_complex
        or cu.dtype == torch.bool
        or cu.numel() < 2
    ):
        got = f"{cu.dtype} of shape {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else cu
        raise ValueError(
            f"{name}: cu_seqlens must be a 1-D int32 tensor [0, end_1, ..., seq_len] of length "
            f"n_docs + 1 >= 2 (document boundaries of the GLOBAL sequence); got {got}"
        )
    vals = tuple(int(c) for c in cu.tolist())
    if vals[0] != 0:
        raise ValueError(f"{name}: cu_seqlens must start at 0, got {list(vals[:4])}...")
    bad = [i for i in range(1, len(vals)) if vals[i] <= vals[i - 1]]
    if bad:
        i = bad[0]
        raise ValueError(
            f"{name}: cu_seqlens must be strictly increasing (no empty documents); "
            f"cu_seqlens[{i - 1}] = {vals[i - 1]} >= cu_seqlens[{i}] = {vals[i]}"
        )
    if vals[-1] != seq_len:
        raise ValueError(
            f"{name}: cu_seqlens must end at the global sequence length {seq_len} "
            f"(world size x local length), got {vals[-1]}; cu_seqlens describes the whole "
            "sequence before sharding: pad the last document to fill it"
        )
    return vals


def check_row_cu_seqlens(cu_seqlens, batch: int, seq_len: int, *, name: str):
    """One ``cu_seqlens`` per batch row -> a tuple of tuples (each as check_cu_seqlens)."""
    if len(cu_seqlens) != batch:
        raise ValueError(
            f"{name}: cu_seqlens is a list of {len(cu_seqlens)} tensors; give one per batch "
            f"row ({batch}), or one tensor for every row"
        )
    return tuple(check_cu_seqlens(c, seq_len, name=name) for c in cu_seqlens)


def _end_to_end(row_cus, seq_len: int) -> tuple[int, ...]:
    """The rows' documents over the rows laid end to end (row i shifted by i * seq_len)."""
    out = [0]
    for i, cu in enumerate(row_cus):
        out += [i * seq_len + c for c in cu[1:]]
    return tuple(out)


def check_window(window, causal: bool, *, name: str) -> tuple[int, int] | None:
    """``window=(left, right)`` in tokens, -1 = unbounded -> a tuple, or None for no bound."""
    if window is None:
        return None
    try:
        left, right = (operator.index(x) for x in window)
        if isinstance(window, (str, bytes)):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(
            f"{name}: window must be a pair of ints (left, right), -1 = unbounded; got {window!r}"
        ) from None
    if left < -1 or right < -1:
        raise ValueError(
            f"{name}: window=({left}, {right}): each side is a token count >= 0, or -1 for "
            "unbounded"
        )
    if causal and right > 0:
        raise ValueError(
            f"{name}: window=({left}, {right}) with causal=True: a causal query never sees "
            f"keys to its right, so right must be 0 (or -1); pass window=({left}, 0), or "
            "causal=False for a two-sided window"
        )
    return None if left == -1 and right == -1 else (left, right)


def check_heads(h: int, ulysses: int, *, strategy: str, name: str) -> None:
    if h % ulysses != 0:
        dim = "the ulysses mesh dimension" if strategy == "hybrid" else "the world size"
        raise ValueError(
            f"{name}: Ulysses splits the {h} query heads over {dim} ({ulysses} ranks), so the "
            f"heads must be divisible by {ulysses}; no split exists. Use strategy='ring' or "
            f"'allgather', or 'hybrid' with a ulysses dimension that divides {h}"
        )


def _check_config(strategy, group, mesh, *, name: str):
    """Rank-invariant configuration: raises at once. Returns the groups to agree over."""
    if strategy not in STRATEGIES:
        raise ValueError(f"{name}: strategy={strategy!r} is unknown; choose one of {STRATEGIES}")
    if strategy == "hybrid":
        if mesh is None:
            raise ValueError(
                f"{name}: strategy='hybrid' needs mesh= a 2-D DeviceMesh named ('ring', "
                "'ulysses'); group= is not used"
            )
        if group is not None:
            raise ValueError(f"{name}: strategy='hybrid' takes its groups from mesh=; drop group=")
        uly, ring = mesh_groups(mesh, name=name)
        return [ring, uly]  # agree across rings first, then inside each Ulysses group
    if mesh is not None:
        raise ValueError(
            f"{name}: mesh= is only for strategy='hybrid'; pass the process group as group="
        )
    return [group]


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    strategy: str = "ring",
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str = "zigzag",
    group=None,
    mesh=None,
    cu_seqlens: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    return_lse: bool = False,
    kernel: str | Kernel = "auto",
    grad_precision: str = "auto",
):
    """Exact attention over a sequence sharded across ranks, by one of :data:`STRATEGIES`.

    Args:
        q: (b, s_local, h, d) this rank's queries (flash-attn layout), the ``layout`` shard of
            this rank (hybrid: of cp rank ring_rank * U + ulysses_rank, see
            :func:`ringattn.strategies.hybrid_rank`).
        k, v: (b, s_local, h_kv, d), ``h % h_kv == 0``.
        strategy: "ring", "allgather", "ulysses" (needs h % W == 0) or "hybrid".
        causal: causal mask in GLOBAL token positions.
        softmax_scale: defaults to ``d ** -0.5``.
        layout: "zigzag" (default: equal causal work on every rank, see
            :func:`ringattn.ring_attention`), "contiguous", "striped", or "packed"
            (:mod:`ringattn.balance`: balanced for the documents of ``cu_seqlens``; shard
            with ``ringattn.shard(x, "packed", ..., cu_seqlens=cu_seqlens)``, row by row for
            a list of per-row ``cu_seqlens``).
        group: process group (default: the world; one process without torch.distributed).
        mesh: for "hybrid": a 2-D DeviceMesh with dims named "ring" and "ulysses".
        cu_seqlens: (n_docs + 1,) int32, GLOBAL document boundaries, 0 first and the global
            length last: no token attends across a boundary. Rows with documents of their
            own: a list of b such tensors, one per row (the ring then runs one pass for the
            whole batch, the other strategies one per row).
        window: (left, right): query at p sees keys in [p - left, p + right]; -1 = unbounded.
            With causal=True, right must be 0 or -1.
        return_lse: also return lse (b, h, s_local) fp32 (natural log, scale applied).
        kernel: "auto", "blockwise", "sdpa", "flash_attn" or a Kernel.
        grad_precision: "auto", "exact" or "fast", as in :func:`ringattn.ring_attention`.

    Returns:
        out (b, s_local, h, d) in the input dtype, or (out, lse).
    """
    name = f"context_parallel_attention(strategy={strategy!r})"
    groups = _check_config(strategy, group, mesh, name=name)
    ranks = [world_of(g) for g in groups]
    world = 1
    for _, w in ranks:
        world *= w
    ulysses = {"ulysses": world, "hybrid": ranks[-1][1]}.get(strategy, 1)
    error, cu, win, kern, row_cus = None, None, None, None, None
    try:
        check_qkv(q, k, v, name=name)
        if layout != PACKED:  # "packed" holds any s / W tokens; it needs the documents
            check_layout_len(layout, q.shape[1], name=name)
        kern = get_kernel(kernel, q.device, q.dtype, grad_precision)
        if isinstance(cu_seqlens, (list, tuple)):
            row_cus = check_row_cu_seqlens(cu_seqlens, q.shape[0], world * q.shape[1], name=name)
            cu = _end_to_end(row_cus, world * q.shape[1])
        else:
            cu = check_cu_seqlens(cu_seqlens, world * q.shape[1], name=name)
        if layout == PACKED and cu is None:
            raise ValueError(
                f"{name}: layout='packed' is built from the documents: pass cu_seqlens (the "
                "one the inputs were sharded with), or use layout='zigzag' without documents"
            )
        win = check_window(window, causal, name=name)
        check_heads(q.shape[2], ulysses, strategy=strategy, name=name)
    except ValueError as e:
        error = e
    meta = [-1] * 13
    if error is None:
        cu_sum = 0 if cu is None else sum((i + 1) * c for i, c in enumerate(cu)) % (1 << 61)
        meta = [
            *q.shape,
            k.shape[2],
            dtype_code(q.dtype),
            ALL_LAYOUTS.index(layout),
            int(causal),
            STRATEGIES.index(strategy),
            *(win or (-1, -1)),
            0 if cu is None else len(cu),
            cu_sum,
        ]
    for g in groups:  # two rounds for a mesh, so a bad rank reaches every rank of it
        try:
            agree(g, meta, error, name=name, fields=_FIELDS)
        except ValueError as e:
            error = e
    if error is not None:
        raise error
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if row_cus is not None and strategy != "ring":  # one pass per row, checked once above
        outs = [
            _strategy_call(
                strategy, q[i : i + 1], k[i : i + 1], v[i : i + 1], group, mesh, return_lse,
                scale=scale, causal=causal, layout=layout, cu=c, window=win, kernel=kern,
            )
            for i, c in enumerate(row_cus)
        ]  # fmt: skip
        out, lse = (torch.cat(t, dim=0) for t in zip(*outs))
        return (out, lse) if return_lse else out
    kw = dict(scale=scale, causal=causal, layout=layout, cu=cu, window=win, kernel=kern)
    if strategy == "ring" and row_cus is not None:
        out, lse = _ring_rows(q, k, v, ranks[0][0], world, group, **kw)
    elif strategy == "ring":
        rank, _ = ranks[0]
        plan = ring_mask_plan(
            layout, world, rank, q.shape[1], causal=causal, cu=cu, window=win, device=str(q.device)
        )
        out, lse = ring_pass(q, k, v, scale=scale, plan=plan, ring=Ring(group), kernel=kern)
    else:
        out, lse = _strategy_call(strategy, q, k, v, group, mesh, return_lse, **kw)
    return (out, lse) if return_lse else out


def _strategy_call(strategy, q, k, v, group, mesh, return_lse, **kw):
    """The all-gather, Ulysses or hybrid strategy on checked inputs -> (out, lse)."""
    if strategy == "allgather":
        return allgather_attention(q, k, v, group=group, **kw)
    if strategy == "ulysses":
        return ulysses_attention(q, k, v, group=group, need_lse=return_lse, **kw)
    return hybrid_attention(q, k, v, mesh=mesh, need_lse=return_lse, **kw)


def _ring_rows(q, k, v, rank, world, group, *, scale, causal, layout, cu, window, kernel):
    """One ring pass for b rows with documents of their own: the rows are laid end to end
    as one sequence of b * s tokens (``cu`` separates them, so nothing crosses a row) and
    the plan uses each row's layout positions. K/V of every row travel together: W-1 hops
    for the batch instead of W-1 per row."""
    b, n = q.shape[:2]
    fold = lambda t: t.reshape(1, b * n, *t.shape[2:])  # noqa: E731  # (1, b*n, h, d)
    plan = ring_mask_plan(
        layout, world, rank, b * n, causal=causal, cu=cu, window=window,
        device=str(q.device), rows=b,
    )  # fmt: skip
    out, lse = ring_pass(
        fold(q), fold(k), fold(v), scale=scale, plan=plan, ring=Ring(group), kernel=kernel
    )
    # out (1, b*n, h, d) -> (b, n, h, d); lse (1, h, b*n) -> (b, h, n)
    return out.view(b, n, *out.shape[2:]), lse.view(lse.shape[1], b, n).transpose(0, 1)
