"""AdamW, the warmup + cosine learning-rate schedule and global gradient clipping."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

__all__ = ["build_optimizer", "clip_grad_norm", "lr_at"]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW over every parameter; no weight decay on norms (1-D weights), as in LLaMA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # foreach=False: one fused multi-tensor kernel would need every DTensor on one mesh
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False
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
    """
    grads = [p.grad for p in params if p.grad is not None]
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        local, copies = g, world
        if isinstance(g, DTensor):
            local = g.to_local()
            copies = world // _n_shards(g)
        total += local.double().pow(2).sum() / copies
    if world > 1:
        dist.all_reduce(total)
    norm = float(total.sqrt())
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef)
    return norm


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
