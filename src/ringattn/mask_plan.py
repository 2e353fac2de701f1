"""Which (query, key) blocks a rank computes under causal, document and window masks. Pure.

Every mask here allows the query at global position p exactly the keys whose positions lie
in ONE interval:

    lo(p) = max(doc_start(p), p - left)          (left = -1: no window bound)
    hi(p) = min(doc_end(p) - 1, p if causal, p + right)

Each rank holds its tokens in increasing position order in every layout, so for a block of
keys that interval is a contiguous range of key rows ``[a_i, b_i)``, found by binary search:
O(n log n) per block, never an n x n matrix. From those ranges:

- a block with no allowed pair is skipped (not computed);
- the work shrinks to the bounding box of its allowed pairs;
- a box that is all-allowed runs unmasked, a square box that is exactly top-left causal runs
  with ``causal=True``, anything else carries a :class:`MaskSpec` restricted to the box.

When the whole block is neither, it is cut at document boundaries, at the layout's chunk
boundaries (zigzag's two halves) and every ``tile`` (:data:`MASK_TILE`) rows and keys, each
piece is boxed on its own, and adjacent all-allowed pieces are merged back. Without
documents or a window this reproduces :func:`ringattn.schedule.ring_plan` exactly.

Ring plans are truncated: T = 1 + (the last step at which any rank has work), so a causal
window of ``left`` tokens over a contiguous layout runs 1 + ceil(left / n) steps, not W.
"""

from __future__ import annotations

import bisect
import functools
import math

import torch

from .balance import PACKED
from .kernels.mask import MaskSpec
from .layouts import local_indices
from .schedule import BlockWork, RingPlan, ring_plan

MAX_RUNS = 4  # cut at runs of consecutive positions only when there are this few (zigzag: 2)
# A block that needs a mask is also cut every MASK_TILE rows and keys: a dense mask never
# exceeds MASK_TILE^2 and tiles a window or a document boundary rules out are skipped.
MASK_TILE = 1024

Window = tuple[int, int] | None
CuSeqlens = tuple[int, ...] | None


def row_ranges(
    q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool, cu: CuSeqlens, window: Window
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allowed key rows ``[a, b)`` of every query, each (nq,) long; ``k_pos`` sorted."""
    lo = torch.zeros_like(q_pos)
    hi = torch.full_like(q_pos, torch.iinfo(torch.long).max // 2)
    if cu is not None:
        cu_t = torch.tensor(cu, dtype=torch.long)
        doc = torch.bucketize(q_pos, cu_t[1:], right=True)
        lo, hi = cu_t[doc], cu_t[doc + 1] - 1
    if causal:
        hi = torch.minimum(hi, q_pos)
    if window is not None:
        left, right = window
        if left >= 0:
            lo = torch.maximum(lo, q_pos - left)
        if right >= 0:
            hi = torch.minimum(hi, q_pos + right)
    a = torch.searchsorted(k_pos, lo)
    b = torch.searchsorted(k_pos, hi, right=True)
    return a, torch.maximum(a, b)


def _doc_ids(pos: torch.Tensor, cu: CuSeqlens) -> torch.Tensor | None:
    if cu is None:
        return None
    return torch.bucketize(pos, torch.tensor(cu[1:], dtype=torch.long), right=True)


def _cuts(pos: torch.Tensor, cu: CuSeqlens, tile: int | None) -> list[int]:
    """Row indices where a new piece starts (and the end): runs, documents, tiles."""
    n = pos.numel()
    cuts = {0, n}
    breaks = (torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist()
    if len(breaks) < MAX_RUNS:
        cuts.update(breaks)
    if cu is not None:
        cuts.update(torch.searchsorted(pos, torch.tensor(cu, dtype=torch.long)).tolist())
    if tile is not None:
        cuts.update(range(0, n, tile))
    return sorted(c for c in cuts if 0 <= c <= n)


def _box(a, b, q0: int, k0: int, k1: int):
    """Bounding box of the rows' ranges clipped to keys [k0, k1); None if empty.

    Returns (qs, ks, kind) with kind "full", "causal" or "mask"; ``a``/``b`` are the ranges of
    the rows starting at ``q0``.
    """
    a, b = a.clamp(k0, k1), b.clamp(k0, k1)
    rows = torch.nonzero(a < b).flatten()
    if rows.numel() == 0:
        return None
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    a, b = a[r0:r1], b[r0:r1]
    kb0, kb1 = int(a.min()), int(b.max())
    if bool((a == kb0).all()) and bool((b == kb1).all()):
        kind = "full"
    elif (
        r1 - r0 == kb1 - kb0
        and bool((a == kb0).all())
        and torch.equal(b, torch.arange(kb0 + 1, kb1 + 1))
    ):
        kind = "causal"
    else:
        kind = "mask"
    return slice(q0 + r0, q0 + r1), slice(kb0, kb1), kind


def _work(qs, ks, kind, q_pos, k_pos, *, causal, cu, window, device) -> BlockWork:
    if kind == "full":
        return BlockWork(qs, ks, False)
    if kind == "causal":
        return BlockWork(qs, ks, True)
    qd, kd = _doc_ids(q_pos[qs], cu), _doc_ids(k_pos[ks], cu)
    mv = lambda t: None if t is None else t.to(device)
    mask = MaskSpec(mv(q_pos[qs]), mv(k_pos[ks]), causal, mv(qd), mv(kd), window)
    return BlockWork(qs, ks, False, mask)


def merge_works(works: list[BlockWork]) -> list[BlockWork]:
    """Merge unmasked full works that touch: same q rows and adjacent keys, then same keys
    and adjacent q rows (two sorted passes, linear after the sort)."""
    plain = lambda w: w.mask is None and not w.causal

    def one_pass(works, key, adjacent, join):
        out: list[BlockWork] = []
        for w in sorted(works, key=key):
            if out and plain(out[-1]) and plain(w) and adjacent(out[-1], w):
                out[-1] = join(out[-1], w)
            else:
                out.append(w)
        return out

    works = one_pass(
        works,
        lambda w: (w.q.start, w.q.stop, w.kv.start),
        lambda x, y: x.q == y.q and x.kv.stop == y.kv.start,
        lambda x, y: BlockWork(x.q, slice(x.kv.start, y.kv.stop), False),
    )
    works = one_pass(
        works,
        lambda w: (w.kv.start, w.kv.stop, w.q.start),
        lambda x, y: x.kv == y.kv and x.q.stop == y.q.start,
        lambda x, y: BlockWork(slice(x.q.start, y.q.stop), x.kv, False),
    )
    return sorted(works, key=lambda w: (w.q.start, w.kv.start))


def block_works(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    cu: CuSeqlens = None,
    window: Window = None,
    tile: int | None = MASK_TILE,
    device=None,
) -> tuple[BlockWork, ...]:
    """The works of one (query block, key block) pair; () when nothing is allowed.

    q_pos (nq,), k_pos (nk,): sorted global positions (long, CPU) of the local query rows and
    of the key rows held. Slices index those rows; MaskSpec tensors go to ``device``.
    """
    a, b = row_ranges(q_pos, k_pos, causal=causal, cu=cu, window=window)
    kw = dict(causal=causal, cu=cu, window=window, device=device)
    whole = _box(a, b, 0, 0, k_pos.numel())
    if whole is None:
        return ()
    if whole[2] != "mask":
        return (_work(*whole, q_pos, k_pos, **kw),)
    qc, kc = _cuts(q_pos, cu, tile), _cuts(k_pos, cu, tile)
    works = []
    for q0, q1 in zip(qc[:-1], qc[1:]):
        ra, rb = a[q0:q1], b[q0:q1]
        live = ra < rb
        if not bool(live.any()):
            continue
        lo, hi = int(ra[live].min()), int(rb[live].max())
        # only the key pieces that overlap [lo, hi): with many documents, a few per q piece
        first = bisect.bisect_right(kc, lo) - 1
        last = bisect.bisect_left(kc, hi)
        for k0, k1 in zip(kc[first:last], kc[first + 1 : last + 1]):
            box = _box(ra, rb, q0, k0, k1)
            if box is not None:
                works.append(_work(*box, q_pos, k_pos, **kw))
    return tuple(merge_works(works))


# ----------------------------------------------------------------------------- ring plans


def group_positions(
    seq_len: int,
    layout: str,
    world: int,
    group: int,
    index: int,
    rows: int = 1,
    cu: CuSeqlens = None,
) -> torch.Tensor:
    """Sorted global positions held together by ranks ``index*group .. index*group+group-1``
    of ``layout`` over ``world`` ranks (group = 1: one rank's own positions).

    ``rows`` > 1: a batch of rows of ``seq_len`` tokens each, laid end to end (row i at
    positions ``i*seq_len ...``), each row sharded by ``layout`` on its own. ``cu``: the
    documents (of the rows end to end), which layout "packed" is built from, row by row."""

    def one(row: int) -> torch.Tensor:
        cu_row = row_documents(cu, seq_len, row) if layout == PACKED else None
        parts = [
            local_indices(seq_len, layout, index * group + u, world, cu_seqlens=cu_row)
            for u in range(group)
        ]
        return torch.cat(parts).sort().values

    if layout != PACKED:  # every row has the same positions
        return torch.cat([i * seq_len + one(0) for i in range(rows)])
    return torch.cat([i * seq_len + one(i) for i in range(rows)])


def row_documents(cu: CuSeqlens, seq_len: int, row: int) -> CuSeqlens:
    """Row ``row``'s own ``cu_seqlens`` out of the documents of rows of ``seq_len`` tokens laid
    end to end (every row boundary is a document boundary)."""
    if cu is None:
        return None
    lo, hi = row * seq_len, (row + 1) * seq_len
    return tuple(c - lo for c in cu[bisect.bisect_left(cu, lo) : bisect.bisect_right(cu, hi)])


def ring_length(pos: list[torch.Tensor], *, causal: bool, cu: CuSeqlens, window: Window) -> int:
    """T = 1 + the last ring step at which any rank has an allowed pair (same on all ranks)."""
    world, last = len(pos), 0
    for r in range(world):
        for i in range(world - 1, last, -1):
            a, b = row_ranges(pos[r], pos[(r - i) % world], causal=causal, cu=cu, window=window)
            if bool((a < b).any()):
                last = i
                break
    return last + 1


@functools.lru_cache(maxsize=256)
def ring_mask_plan(
    layout: str,
    world: int,
    rank: int,
    n: int,
    *,
    causal: bool,
    cu: CuSeqlens = None,
    window: Window = None,
    group: int = 1,
    tile: int | None = MASK_TILE,
    device: str = "cpu",
    rows: int = 1,
    shortcut: bool = True,
) -> RingPlan:
    """The ring plan of ``rank`` in a ring of ``world`` ranks, each holding ``n`` tokens.

    With ``group`` > 1 (hybrid), ring rank r holds the sorted positions of ranks
    ``r*group .. r*group+group-1`` of ``layout`` over ``world * group`` ranks, n tokens in all.
    With ``rows`` > 1, the n tokens are ``rows`` batch rows of n / rows tokens laid end to
    end (see :func:`group_positions`; ``cu`` must then separate the rows). The plan has the
    same length T <= world on every rank; empty steps are skipped. ``shortcut=False``: search
    the positions even without documents or a window (every slice then has both ends).
    """
    if shortcut and cu is None and window is None and group == 1 and rows == 1:
        return ring_plan(layout, causal, rank, world, n)  # the same plan, without the search
    seq = n // rows * world
    pos = [group_positions(seq, layout, world * group, group, r, rows, cu) for r in range(world)]
    T = ring_length(pos, causal=causal, cu=cu, window=window)
    kw = dict(causal=causal, cu=cu, window=window, tile=tile, device=torch.device(device))
    return tuple(block_works(pos[rank], pos[(rank - i) % world], **kw) for i in range(T))


@functools.lru_cache(maxsize=256)
def source_plan(layout: str, world: int, rank: int, n: int, **kw) -> RingPlan:
    """All-gather plan: for each source rank j, this rank's works against j's K/V block.

    The ring plan's steps by source (ring step i holds the K/V of rank (rank - i) % W; the
    steps the ring truncates have no work). ``kw``: the options of :func:`ring_mask_plan`."""
    ring = ring_mask_plan(layout, world, rank, n, shortcut=False, **kw)
    steps = ((rank - j) % world for j in range(world))
    return tuple(ring[i] if i < len(ring) else () for i in steps)


# ----------------------------------------------------------------------------- FLOPs


def work_pairs(w: BlockWork, n_q: int, n_k: int) -> tuple[int, int]:
    """(computed, allowed) (query, key) pairs of one work on blocks of n_q x n_k rows.

    A masked work computes its whole box with a dense-mask kernel (the blockwise kernel skips
    fully masked tiles inside, so it does at most that); ``allowed`` counts the useful pairs,
    from the positions (per document), never from a dense mask.
    """
    lq = len(range(*w.q.indices(n_q)))
    lk = len(range(*w.kv.indices(n_k)))
    if w.mask is None:
        pairs = lq * (lq + 1) // 2 if w.causal else lq * lk
        return pairs, pairs
    m = w.mask
    qp, kp = m.q_pos.cpu(), m.k_pos.cpu()
    if m.q_doc is None:
        return lq * lk, _allowed(qp, kp, m)
    qd, kd = m.q_doc.cpu(), m.k_doc.cpu()
    docs = torch.unique(qd).tolist()
    return lq * lk, sum(_allowed(qp[qd == d], kp[kd == d], m) for d in docs)


def _allowed(q_pos, k_pos, m: MaskSpec) -> int:
    a, b = row_ranges(q_pos, k_pos, causal=m.causal, cu=None, window=m.window)
    return int((b - a).sum())


def plan_flops(
    plan, n_q: int, n_k: int, *, batch=1, heads=1, head_dim=1, backward=False, allowed=True
) -> int:
    """Attention matmul FLOPs of a plan (any nesting of works), as in
    :func:`ringattn.schedule.attention_flops`: 4*b*h*d per pair forward, 10*b*h*d backward.
    ``allowed=False`` counts the pairs a dense-mask kernel computes instead."""
    per_pair = (10 if backward else 4) * batch * heads * head_dim
    total = 0
    for step in plan:
        for w in step:
            computed, ok = work_pairs(w, n_q, n_k)
            total += ok if allowed else computed
    return per_pair * total


def mask_flops(
    layout: str,
    world: int,
    seq_len: int,
    *,
    causal: bool,
    cu_seqlens=None,
    window: Window = None,
    batch: int = 1,
    heads: int = 1,
    head_dim: int = 1,
    backward: bool = False,
) -> list[int]:
    """Useful attention FLOPs each ring (or all-gather) rank performs under the mask."""
    cu = None if cu_seqlens is None else tuple(int(c) for c in cu_seqlens)
    n = seq_len // world
    kw = dict(batch=batch, heads=heads, head_dim=head_dim, backward=backward)
    return [
        plan_flops(
            ring_mask_plan(layout, world, r, n, causal=causal, cu=cu, window=window), n, n, **kw
        )
        for r in range(world)
    ]


def window_steps(left: int, n: int, world: int) -> int:
    """Ring steps a causal window of ``left`` tokens needs on a contiguous layout."""
    return min(world, 1 + math.ceil(max(left, 0) / n)) if left >= 0 else world
