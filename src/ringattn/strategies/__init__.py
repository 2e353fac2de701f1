"""The context-parallel family beside the ring: all-gather, Ulysses, hybrid (Ulysses x ring).

Each takes validated inputs sharded by a layout and returns ``(out, lse)``; the public entry
point, with the checks, is :func:`ringattn.cp.context_parallel_attention`.
"""

from .allgather import allgather_attention
from .hybrid import hybrid_attention, hybrid_rank, mesh_groups
from .ulysses import kv_repeats, ulysses_attention, usp_attention

__all__ = [
    "allgather_attention",
    "hybrid_attention",
    "hybrid_rank",
    "kv_repeats",
    "mesh_groups",
    "ulysses_attention",
    "usp_attention",
]
