"""Which blocks a rank computes at each ring step. Pure functions, no communication.

At ring step i, rank r holds the K/V block that started on rank ``(r - i) mod W``. For the
layout and mask, ``ring_work`` says which slice of the local queries meets which slice of that
K/V block and whether the pair needs a (top-left, square) causal mask; an empty tuple means
the step is skipped entirely (not computed).

Causal rules (local length n, W ranks, source rank j):
- contiguous: j < r full; j == r causal; j > r skipped (rank 0 idles most steps).
- zigzag (rank r holds chunks r and 2W-1-r, each n/2): i == 0 causal on the whole local block
  (positions increase through the concatenation, so top-left causal is exact); j < r: all
  queries x first half of K/V; j > r: second half of queries x all K/V. Same work every step.
- striped (rank r holds r, r+W, ...): j <= r causal; j > r causal with the diagonal excluded,
  which is causal on queries[1:] x keys[:-1].
"""

from __future__ import annotations

from dataclasses import dataclass

from .kernels.mask import MaskSpec
from .layouts import check_layout, check_sizes


@dataclass(frozen=True)
class BlockWork:
    q: slice  # local query rows
    kv: slice  # rows of the K/V block held at this step
    causal: bool  # top-left causal on a square block
    mask: MaskSpec | None = None  # general mask of this (q, kv) pair, when not plain causal

    def pairs(self, n: int) -> int:
        """Number of (query, key) pairs computed, for a local length n."""
        if self.mask is not None:
            return int(self.mask.dense().sum())
        lq = len(range(*self.q.indices(n)))
        lk = len(range(*self.kv.indices(n)))
        return lq * (lq + 1) // 2 if self.causal else lq * lk


RingPlan = tuple[tuple[BlockWork, ...], ...]  # per ring step, this rank's work (maybe empty)


ALL = slice(0, None)


def ring_src(rank: int, step: int, world_size: int) -> int:
    """The rank whose K/V block ``rank`` holds at ring ``step``."""
    return (rank - step) % world_size


def ring_work(
    layout: str, causal: bool, rank: int, world_size: int, step: int, n: int
) -> tuple[BlockWork, ...]:
    """Work of ``rank`` at ring ``step`` with local length ``n``."""
    check_layout(layout)
    if not causal:
        return (BlockWork(ALL, ALL, False),)
    j = ring_src(rank, step, world_size)
    if layout == "contiguous":
        if j < rank:
            return (BlockWork(ALL, ALL, False),)
        return (BlockWork(ALL, ALL, True),) if j == rank else ()
    if layout == "zigzag":
        half = n // 2
        if step == 0:
            return (BlockWork(ALL, ALL, True),)
        if j < rank:
            return (BlockWork(ALL, slice(0, half), False),)
        return (BlockWork(slice(half, n), ALL, False),)
    # striped
    if j <= rank:
        return (BlockWork(ALL, ALL, True),)
    return (BlockWork(slice(1, n), slice(0, n - 1), True),) if n > 1 else ()


def ring_plan(layout: str, causal: bool, rank: int, world_size: int, n: int) -> RingPlan:
    """This rank's work at every one of the W ring steps."""
    return tuple(ring_work(layout, causal, rank, world_size, i, n) for i in range(world_size))


def attention_flops(
    layout: str,
    world_size: int,
    seq_len: int,
    causal: bool,
    *,
    batch: int = 1,
    heads: int = 1,
    head_dim: int = 1,
    backward: bool = False,
) -> list[int]:
    """Attention matmul FLOPs each rank performs, from the schedule itself.

    Forward: QK^T and PV, 2 matmuls x 2 FLOPs per (query, key, dim) -> 4*b*h*d per pair.
    Backward recomputes QK^T and adds dV, dP, dQ, dK -> 10*b*h*d per pair (2.5x forward).
    """
    check_layout(layout)
    check_sizes(seq_len, world_size)
    n = seq_len // world_size
    per_pair = (10 if backward else 4) * batch * heads * head_dim
    return [
        per_pair
        * sum(
            w.pairs(n)
            for i in range(world_size)
            for w in ring_work(layout, causal, r, world_size, i, n)
        )
        for r in range(world_size)
    ]


def balance(per_rank: list[float]) -> dict:
    """How uneven per-rank work or time is: ``max_over_min`` (inf when a rank has none) and
    ``max_over_mean``; the slowest rank sets a ring's pace, so 1.0 is perfect balance."""
    lo, hi, mean = min(per_rank), max(per_rank), sum(per_rank) / len(per_rank)
    return dict(max_over_min=hi / lo if lo > 0 else float("inf"), max_over_mean=hi / mean)
