"""Materialise a model built on the ``meta`` device after TP / CP / AC / FSDP were applied.

``to_empty`` gives every rank storage for its own shards only (FSDP2 and DTensor keep the
local shard as the parameter's storage); :func:`dtensor_box` tells the model's
``init_weights`` which box of each global parameter that storage is, so each rank draws
exactly the values an unsharded model would hold there (see ``ringattn.model.init``).
No rank ever allocates a full-size parameter.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

__all__ = ["dtensor_box", "init_local_shards"]


def dtensor_box(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """``(local tensor, global shape, global offset of the local box)`` of ``p``.

    For a DTensor, the offset comes from PyTorch's own ``compute_local_shape_and_global_offset``
    (what distributed checkpointing uses), which also handles FSDP's strided shard of a
    tensor-parallel dim; a plain tensor is its own whole box.
    """
    if not isinstance(p, DTensor):
        return p, tuple(p.shape), (0,) * p.dim()
    local = p.to_local()
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(shape) != tuple(local.shape):
        raise RuntimeError(
            f"local shard {tuple(local.shape)} is not the box {tuple(shape)} PyTorch computes "
            f"for placements {p.placements}; cannot initialise it without the full tensor"
        )
    return local, tuple(p.shape), tuple(offset)


@torch.no_grad()
def init_local_shards(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """``to_empty(device)`` then fill each rank's shards with the layout-independent init.

    ``model`` was built on ``meta`` and already parallelised; it must define
    ``init_weights(seed, box_of)`` and may define ``tie_weights()`` (``to_empty`` replaces
    each parameter separately, which unties shared ones).
    """
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.init_weights(seed, box_of=dtensor_box)
    return model
