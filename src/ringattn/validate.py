"""Input checks shared by every attention entry point.

Local checks raise ``ValueError`` naming the argument and the fix. Cross-rank checks run one
tiny all-gather of each rank's metadata, so a rank with bad input does not leave the others
blocked in a transfer that will never come: every rank raises, naming the offending rank.
That all-gather runs once per distinct signature (:func:`agree`), not on every call.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist

from .comm import CommError, _all_gather_single, _nbytes, _record, world_of
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


# Names of the metadata fields every entry point agrees on, in order: the (q, k) shape
# fields, then the entry point's options (ring.py, cp.py add theirs).
QKV_FIELDS = ("batch", "local seq", "heads", "head_dim", "kv heads", "dtype")

# Signatures (group, names, metadata) that every rank of the group has agreed on. An entry
# is added on every rank of the group at the same call (after an all-gather in which all
# rows were equal and no rank failed), so this set is the same on every rank of a group.
# Bounded: evicted least recently used, which is also the same on every rank.
_CHECKED: OrderedDict[tuple, None] = OrderedDict()
MAX_CHECKED = 1024


def clear_checked() -> None:
    """Forget every agreed signature: the next call of each is checked again. Collective in
    effect: call it on every rank of a group at the same point, or not at all."""
    _CHECKED.clear()


def _meta_device(group) -> torch.device:
    """NCCL only takes CUDA tensors: the metadata goes on this rank's current device."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(
    group, meta: list[int], error: Exception | None, *, name: str, fields: tuple[str, ...]
) -> None:
    """Raise on every rank if any rank failed its local checks (``error``) or if the ranks
    disagree on ``meta`` (ints, one per name in ``fields``).

    Check once, then run free: the first call of each (group, fields, meta) signature runs
    one tiny all-gather (counted in :func:`ringattn.count_comm` as "check") and a host
    sync; later calls with an agreed signature return at once, with no communication.

    Why ranks cannot deadlock on the cache in a correct program: the cache is the same on
    every rank of a group (see ``_CHECKED``) and the key is the metadata that all ranks must
    share, so ranks whose calls agree all hit or all miss. A rank that failed its local
    checks never hits (its error must reach the others). What no cache can catch is a
    contract broken LATER, on some ranks only, with a signature the others agreed before:
    then the others skip the check while this rank runs it; each side waits for the other
    and both raise CommError at the group's timeout instead of computing on mismatched
    shapes (as when a rank fails mid-ring). Telling that case apart from a legitimate
    shape change on every rank would take a collective per call; :func:`clear_checked` on
    every rank forces the next calls to be checked.
    """
    rank, world = world_of(group)
    if world == 1:
        if error is not None:
            raise error
        return
    # None means the default group: key on the group object, so a re-initialised world
    # does not inherit the agreements of an old one
    key = (dist.group.WORLD if group is None else group, fields, tuple(meta))
    if error is None and key in _CHECKED:
        _CHECKED.move_to_end(key)
        return
    device = _meta_device(group)
    row = torch.tensor([0 if error is None else 1, *meta], dtype=torch.long, device=device)
    rows = torch.empty(world * row.numel(), dtype=torch.long, device=device)
    _record("check", _nbytes([row]) * (world - 1))
    try:
        _all_gather_single(rows, row, group=group)
    except Exception as e:
        if error is not None:  # this rank's own error says more than the failed exchange
            raise error from e
        raise CommError(
            f"{name}: rank {rank}: metadata exchange failed: {e}. If other ranks called "
            "with a shape already checked while this rank's differs, they skipped this "
            "check: every rank must call with the same shapes and options"
        ) from e
    if error is not None:
        raise error
    rows = rows.view(world, -1).cpu()  # one host sync per new signature
    bad = [r for r in range(world) if rows[r, 0] != 0]
    if bad:
        raise ValueError(f"{name}: rank(s) {bad} rejected their inputs (see their errors)")
    differ = [r for r in range(world) if not torch.equal(rows[r], rows[0])]
    if differ:
        r = differ[0]
        pairs = [
            f"{f} (rank 0: {a}, rank {r}: {b})"
            for f, a, b in zip(fields, rows[0, 1:].tolist(), rows[r, 1:].tolist())
            if a != b
        ]
        raise ValueError(
            f"{name}: ranks disagree on {', '.join(pairs)}; every rank must hold the same "
            "local length and call with the same arguments"
        )
    _CHECKED[key] = None
    if len(_CHECKED) > MAX_CHECKED:
        _CHECKED.popitem(last=False)


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1
