"""AdamW, the warmup + cosine learning-rate schedule and global gradient clipping."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

__all__ = ["build_optimizer", "clip_grad_norm", "lr_at"]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW over every parameter; no weight decay on norms (1-D weights), as in LLaMA.

    Multi-tensor (``foreach``) updates: one kernel per step for many parameters instead of
    one per parameter. A foreach op needs all its DTensors on one mesh, and TP puts some
    weights on (dp_cp, tp) while the rest live on dp_cp, so each parameter group holds
    parameters of one mesh.
    """
    groups: dict[tuple, list] = {}
    for p in model.parameters():
        mesh = p.device_mesh if isinstance(p, DTensor) else None
        groups.setdefault((p.dim() >= 2, id(mesh)), []).append(p)
    param_groups = [
        {"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0}
        for (decay, _), ps in groups.items()
    ]
    return torch.optim.AdamW(
        param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True
    )


def lr_at(step: int, cfg, total_steps: int) -> float:
    """Linear warmup over ``warmup_steps`` (step 0 gets lr / warmup), then cosine decay to
    ``lr * min_lr_ratio`` at ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most ``max_norm``; returns the norm
    before clipping (``max_norm <= 0``: only measure). Collective over the world group.

    Gradients may be DTensors on different meshes (FSDP over dp_cp, dp_cp x tp for the
    tensor-parallel weights). Each rank sums the squares of its local shards; one all-reduce
    over the world sums them, and each parameter's sum is divided by how many ranks hold a
    copy of each of its shards (``world / number of distinct shards``; a plain tensor is on
    every rank). One collective per step instead of one per parameter.

    Multi-tensor ops: one ``_foreach_norm`` per distinct copy count and one ``_foreach_mul_``,
    not a loop of kernels per parameter. The scale ``min(1, max_norm / (norm + 1e-6))`` stays
    on the device (no branch on the norm); the one host sync is the returned, logged norm.
    """
    grads = [p.grad for p in params if p.grad is not None]
    world = dist.get_world_size() if dist.is_initialized() else 1
    by_copies: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        local, copies = g, world
        if isinstance(g, DTensor):
            local, copies = g.to_local(), world // _n_shards(g)
        by_copies.setdefault(copies, []).append(local)
    device = grads[0].device if grads else _collective_device()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for copies, locals_ in by_copies.items():
        norms = torch._foreach_norm(locals_, 2, dtype=torch.float32)  # one per tensor, fp32
        total += torch.stack(norms).double().square().sum() / copies
    if world > 1:
        dist.all_reduce(total)
    norm = total.sqrt()
    if max_norm > 0 and grads:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0).float()
        torch._foreach_mul_([t for ts in by_copies.values() for t in ts], coef)
    return float(norm)


def _collective_device() -> torch.device:
    """Where a tensor for a world collective must live: NCCL takes only CUDA tensors."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _n_shards(t: DTensor) -> int:
    """Number of distinct pieces a DTensor is split into (product of sharded mesh dims)."""
    n = 1
    for size, placement in zip(t.device_mesh.shape, t.placements):
        if placement.is_partial():
            raise ValueError("clip_grad_norm: gradients must not be Partial DTensors")
        # Shard, and FSDP-over-TP's _StridedShard (for which is_shard() is False)
        if not placement.is_replicate():
            n *= size
    return n
