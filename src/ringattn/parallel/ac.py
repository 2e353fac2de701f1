"""Activation checkpointing: recompute each transformer block in backward.

Per block, ``full`` keeps only the block's input ``(b, s, dim)`` (and the RoPE tables) and
recomputes everything inside it during backward: roughly one extra forward per step in
exchange for activation memory of ``n_layers * b * s * dim`` plus one block's worth.

It flips :attr:`ringattn.model.Block.ac`, which makes the block call
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` on its own body. Unlike a
wrapper module (``checkpoint_wrapper``) this leaves module paths and state_dict keys
unchanged, so checkpoints and tensor-parallel plans do not care whether AC is on. Order
relative to FSDP2 does not matter: the recompute runs inside the block's backward, after
FSDP2's pre-backward hook has unsharded the block's parameters (checked with ``fully_shard``
per block on 2 gloo ranks: gradients equal the unsharded model's exactly).
"""

from __future__ import annotations

from torch import nn

from ringattn.model.llama import Block

__all__ = ["AC_MODES", "apply_ac"]

AC_MODES = ("full", "none")


def apply_ac(model: nn.Module, mode: str = "full") -> nn.Module:
    """Turn per-block activation checkpointing on (``"full"``) or off (``"none"``) in place.

    Returns ``model``. Raises ``ValueError`` for an unknown mode or a model with no
    :class:`~ringattn.model.Block`.
    """
    if mode not in AC_MODES:
        raise ValueError(
            f"activation checkpointing mode {mode!r} is unknown; use one of {AC_MODES}"
        )
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError("apply_ac found no ringattn.model.Block in the model")
    for block in blocks:
        block.ac = mode == "full"
    return model
