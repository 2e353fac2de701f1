"""Input checks shared by every attention entry point.

Local checks raise ``ValueError`` naming the argument and the fix. Cross-rank checks run one
tiny all-gather of each rank's metadata, so a rank with bad input does not leave the others
blocked in a transfer that will never come: every rank raises, naming the offending rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import CommError, _all_gather_single, world_of
from .layouts import LAYOUTS

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q, k, v, *, name: str = "ring_attention", same_len: bool = True) -> None:
    """Shapes (b, s, h, d) / (b, s, h_kv, d), dtypes and devices of q, k, v."""
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name}: {arg} must be 4-D (batch, seq, heads, head_dim) in flash-attn layout, "
                f"got shape {tuple(t.shape)}; SDPA-layout (b, h, s, d) tensors need "
                ".transpose(1, 2)"
            )
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: {arg} has dtype {t.dtype}; use one of {_DTYPES}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
            "cast them to one dtype"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{name}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    if k.shape != v.shape:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} must match")
    b, s, h, d = q.shape
    if k.shape[0] != b or (same_len and k.shape[1] != s):
        raise ValueError(
            f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and local "
            "sequence length (dims 0 and 1)"
        )
    if k.shape[3] != d:
        raise ValueError(f"{name}: head_dim of q ({d}) and k ({k.shape[3]}) must match")
    if h % k.shape[2] != 0:
        raise ValueError(
            f"{name}: q heads ({h}) must be a multiple of k/v heads ({k.shape[2]}) for GQA/MQA"
        )
    if s == 0 or b == 0:
        raise ValueError(f"{name}: empty input of shape {tuple(q.shape)}")


def check_layout_len(layout: str, s_local: int, *, name: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{name}: layout={layout!r} is unknown; choose one of {LAYOUTS}")
    if layout == "zigzag" and s_local % 2 != 0:
        raise ValueError(
            f"{name}: layout='zigzag' needs an even local length (the global sequence divisible "
            f"by 2 * world_size); got local length {s_local}. Pad the sequence."
        )


def agree(group, meta: list[int], error: Exception | None, *, name: str) -> None:
    """All-gather ``meta`` (ints) with an error flag; raise on every rank if any rank failed
    its local checks or if the ranks disagree on the metadata."""
    rank, world = world_of(group)
    if world == 1:
        if error is not None:
            raise error
        return
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    row = torch.tensor([0 if error is None else 1, *meta], dtype=torch.long, device=device)
    rows = torch.empty(world * row.numel(), dtype=torch.long, device=device)
    try:
        _all_gather_single(rows, row, group=group)
    except Exception as e:
        raise CommError(f"{name}: rank {rank}: metadata exchange failed: {e}") from e
    if error is not None:
        raise error
    rows = rows.view(world, -1).cpu()
    bad = [r for r in range(world) if rows[r, 0] != 0]
    if bad:
        raise ValueError(f"{name}: rank(s) {bad} rejected their inputs (see their errors)")
    differ = [r for r in range(world) if not torch.equal(rows[r], rows[0])]
    if differ:
        raise ValueError(
            f"{name}: ranks disagree on (batch, local seq, heads, kv heads, head_dim, dtype, "
            f"options): rank 0 has {rows[0, 1:].tolist()}, rank {differ[0]} has "
            f"{rows[differ[0], 1:].tolist()}; every rank must hold the same local length and "
            "call with the same arguments"
        )


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1
