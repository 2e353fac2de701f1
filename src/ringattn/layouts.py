"""How the global sequence is split over the ranks, as permutations.

For a layout and a world size W, ``permutation(s, layout, W)`` is the list of global token
indices in rank-major order: rank r holds ``perm[r*s/W:(r+1)*s/W]``. Shard is an index
select with that slice, unshard gathers and indexes with ``argsort(perm)``, and the RoPE
positions a rank needs are the same slice. Example, s = 8, W = 2:

    contiguous  rank0: 0 1 2 3        rank1: 4 5 6 7
    zigzag      rank0: 0 1 | 6 7      rank1: 2 3 | 4 5     (chunks r and 2W-1-r of 2W)
    striped     rank0: 0 2 4 6        rank1: 1 3 5 7       (tokens r, r+W, r+2W, ...)

"packed" (:mod:`ringattn.balance`) is the fourth layout: it depends on the documents, so every
function here takes ``cu_seqlens=`` and "packed" needs it. It is not in :data:`LAYOUTS` (the
layouts that need nothing but the length); :data:`ALL_LAYOUTS` has all four.
"""

from __future__ import annotations

import operator

import torch
import torch.distributed as dist

from .balance import PACKED, check_packed, packed_indices

LAYOUTS = ("contiguous", "zigzag", "striped")
ALL_LAYOUTS = (*LAYOUTS, PACKED)


def check_layout(layout: str) -> None:
    if layout not in ALL_LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown; choose one of {ALL_LAYOUTS}")


def _as_int(v) -> int | None:
    """``v`` as an int if it is one (numpy and 0-d integer tensors too), else None."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def check_sizes(seq_len: int, world_size: int) -> None:
    """A sequence length >= 0 and a world size >= 1 (both ints)."""
    if _as_int(seq_len) is None or seq_len < 0:
        raise ValueError(f"seq_len={seq_len!r} must be an int >= 0 (the global sequence length)")
    if _as_int(world_size) is None or world_size < 1:
        raise ValueError(
            f"world_size={world_size!r} must be an int >= 1 (the number of ranks the sequence "
            "is split over)"
        )


def check_divisible(seq_len: int, layout: str, world_size: int, cu_seqlens=None) -> None:
    check_layout(layout)
    check_sizes(seq_len, world_size)
    if layout == PACKED:
        check_packed(cu_seqlens, seq_len, world_size)
        return
    parts = 2 * world_size if layout == "zigzag" else world_size
    if seq_len % parts != 0:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by {parts} "
            f"({'2 * world_size' if layout == 'zigzag' else 'world_size'}) for layout="
            f"{layout!r}; pad the sequence to a multiple of {parts}"
        )


def local_indices(
    seq_len: int, layout: str, rank: int, world_size: int, device=None, cu_seqlens=None
) -> torch.Tensor:
    """Global token indices held by ``rank`` (long, (seq_len // world_size,)), in local order
    (increasing in every layout but zigzag, whose two chunks are each increasing)."""
    check_divisible(seq_len, layout, world_size, cu_seqlens)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
    if layout == PACKED:
        return packed_indices(cu_seqlens, rank, world_size, device)
    n = seq_len // world_size
    if layout == "contiguous":
        return torch.arange(rank * n, (rank + 1) * n, device=device)
    if layout == "striped":
        return torch.arange(rank, seq_len, world_size, device=device)
    c = seq_len // (2 * world_size)  # zigzag chunk
    j = 2 * world_size - 1 - rank
    return torch.cat(
        [
            torch.arange(rank * c, (rank + 1) * c, device=device),
            torch.arange(j * c, (j + 1) * c, device=device),
        ]
    )


def permutation(
    seq_len: int, layout: str, world_size: int, device=None, cu_seqlens=None
) -> torch.Tensor:
    """Global indices in rank-major order: ``x[perm]`` lays the sequence out rank after rank."""
    return torch.cat(
        [
            local_indices(seq_len, layout, r, world_size, device, cu_seqlens)
            for r in range(world_size)
        ]
    )


def shard(
    x: torch.Tensor, layout: str, *, rank: int, world_size: int, dim: int = 1, cu_seqlens=None
):
    """The part of the global ``x`` that ``rank`` holds along ``dim`` (pure, no communication).
    ``cu_seqlens`` (n_docs + 1,): the documents, needed by layout "packed"."""
    idx = local_indices(x.shape[dim], layout, rank, world_size, x.device, cu_seqlens)
    if layout == "contiguous":
        n = idx.numel()
        return x.narrow(dim, rank * n, n)
    return x.index_select(dim, idx)


def doc_starts(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """For each global position, the start of its document, (seq_len,) long."""
    cu = cu_seqlens.to(torch.long)
    doc = torch.bucketize(torch.arange(seq_len, device=cu.device), cu[1:], right=True)
    return cu[doc]


def check_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int) -> None:
    """``cu_seqlens``: 1-D, starts at 0, never decreases, ends at ``seq_len`` (reads the
    values: call once per batch, not per layer)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or len(cu_seqlens) < 2:
        raise ValueError(
            "cu_seqlens must be a 1-D tensor (n_docs + 1,) of document boundaries, e.g. "
            f"tensor([0, 5, {seq_len}]); got {cu_seqlens!r}"
        )
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != seq_len:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at seq_len={seq_len}; got {cu[0]} ... {cu[-1]}"
        )
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must not decrease (document boundaries in order); got {cu}")


def positions(
    seq_len: int,
    layout: str,
    *,
    rank: int,
    world_size: int,
    cu_seqlens: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """RoPE positions of the tokens ``rank`` holds: global positions, restarting at 0 at each
    document of ``cu_seqlens`` (int32, (n_docs + 1,)) when given (layout "packed" needs it)."""
    idx = local_indices(seq_len, layout, rank, world_size, device, cu_seqlens)
    if cu_seqlens is None:
        return idx
    check_cu_seqlens(cu_seqlens, seq_len)
    return idx - doc_starts(cu_seqlens.to(idx.device), seq_len)[idx]


def unshard(
    x_local: torch.Tensor, layout: str, *, group=None, dim: int = 1, cu_seqlens=None
) -> torch.Tensor:
    """Gather every rank's part and restore global order along ``dim``. Differentiable: the
    gradient of each rank's part is the sum over ranks of the gradient of its positions.
    ``cu_seqlens``: the GLOBAL documents, needed by layout "packed"."""
    from .comm import all_gather  # local import: comm imports nothing from here

    world = dist.get_world_size(group) if dist.is_initialized() else 1
    full = all_gather(x_local, dim=dim, group=group)
    perm = permutation(full.shape[dim], layout, world, x_local.device, cu_seqlens)
    if layout == "contiguous":
        return full
    return full.index_select(dim, torch.argsort(perm))
