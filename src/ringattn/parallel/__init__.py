"""Parallelism applied to a finished model, in this order (see docs/training.md):

1. :func:`apply_tp` — tensor parallel projections on the ``tp`` mesh dimension;
2. :func:`apply_cp` — the context-parallel attention function on ``cp`` (data are sharded
   by the same layout with :func:`shard_batch`);
3. :func:`apply_ac` — activation checkpointing per block;
4. :func:`apply_fsdp` — FSDP2 over the flattened ``dp_cp`` dimension, blocks then root.

TP must come before FSDP (FSDP shards the TP DTensors further), AC before FSDP so that the
recompute sits inside each FSDP unit, and CP only swaps the attention function.

The trainer builds the model on the ``meta`` device, applies the four, then
:func:`init_local_shards` allocates and initialises each rank's shards only.
"""

from ringattn.parallel.ac import AC_MODES, apply_ac
from ringattn.parallel.cp import STRATEGIES, CPAttention, apply_cp, shard_batch
from ringattn.parallel.dims import ParallelDims, ParallelMesh
from ringattn.parallel.fsdp import apply_fsdp
from ringattn.parallel.init import dtensor_box, init_local_shards
from ringattn.parallel.tp import apply_tp

__all__ = [
    "AC_MODES",
    "STRATEGIES",
    "CPAttention",
    "ParallelDims",
    "ParallelMesh",
    "apply_ac",
    "apply_cp",
    "apply_fsdp",
    "apply_tp",
    "dtensor_box",
    "init_local_shards",
    "shard_batch",
]
