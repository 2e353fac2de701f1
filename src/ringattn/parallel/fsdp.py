"""FSDP2 (``fully_shard``) over the flattened ``dp_cp`` mesh dimension.

Each transformer block is one FSDP unit (all-gathered just before its forward and backward,
resharded after), the root module holds the embeddings, the final norm and the output head.
With tensor parallelism the block parameters are already DTensors on the tp mesh, and
``fully_shard`` adds the dp_cp dimension on top (2-D sharding).

Gradients are **summed**, not averaged, over dp_cp (divide factor 1): the trainer's loss is
already the token-weighted global mean (each rank divides its token-loss sum by the global
token count), so the sum over ranks of the local gradients is exactly the gradient of the
global loss. Averaging would be right only if every rank held the same number of target
tokens, which context parallelism (and answer-only losses) do not guarantee.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

__all__ = ["apply_fsdp"]


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """``fully_shard`` every block, then the root, over the 1-D ``mesh``; returns ``model``.

    ``param_dtype`` is the compute dtype (e.g. bf16; the sharded master weights and the
    optimizer stay fp32); ``reduce_dtype`` the dtype of the gradient reduce-scatter.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            # plain SUM collectives: gloo has no PREMUL_SUM / AVG
            m.set_force_sum_reduction_for_comms(True)
    return model
