"""Hybrid context parallelism (USP / LoongTrain): Ulysses inside, ring across.

``mesh`` is a 2-D :class:`torch.distributed.DeviceMesh` with dimension names "ring" and
"ulysses" (R x U ranks). Ulysses all-to-alls run inside each "ulysses" group (put it on the
fast links: ``init_device_mesh(dev, (R, U), mesh_dim_names=("ring", "ulysses"))`` makes the
U ranks of a group consecutive), and the ring runs across the "ring" groups, each ring
carrying the K/V of one head group.

Layout contract: the caller shards the sequence with the ordinary ``layout`` over W = R*U
ranks, taking the shard of the cp rank ``ring_rank * U + ulysses_rank`` (the group ranks
along each mesh dimension; :func:`hybrid_rank` returns it). With the mesh built as above the
cp rank is the global rank, so ``ringattn.shard(x, layout, rank=dist.get_rank(),
world_size=W)`` is right. After the all-to-all, ring rank r holds the U shards of cp ranks
r*U .. r*U+U-1, sorted by position (zigzag: two contiguous runs; contiguous: one).
"""

from __future__ import annotations

import torch.distributed as dist

from ..comm import Ring
from .ulysses import usp_attention

DIM_NAMES = ("ring", "ulysses")


def mesh_groups(mesh, *, name: str = "hybrid"):
    """(ulysses group, ring group) of a 2-D mesh named ("ring", "ulysses") in any order."""
    names = getattr(mesh, "mesh_dim_names", None)
    ndim = getattr(mesh, "ndim", None)
    if ndim != 2 or names is None or set(names) != set(DIM_NAMES):
        shape = tuple(mesh.shape) if hasattr(mesh, "shape") else None
        raise ValueError(
            f"{name}: strategy='hybrid' needs mesh= a 2-D DeviceMesh with mesh_dim_names "
            f"{DIM_NAMES}, e.g. init_device_mesh('cuda', (ring, ulysses), "
            f"mesh_dim_names={DIM_NAMES}); got {type(mesh).__name__} of shape {shape} and "
            f"names {names}"
        )
    return mesh.get_group("ulysses"), mesh.get_group("ring")


def hybrid_rank(mesh) -> tuple[int, int]:
    """(cp rank, W): the ``layout`` shard this rank must hold is that of ``ring_rank * U +
    ulysses_rank`` among W = R * U."""
    uly, ring = mesh_groups(mesh)
    ur, u = dist.get_rank(uly), dist.get_world_size(uly)
    rr, r = dist.get_rank(ring), dist.get_world_size(ring)
    return rr * u + ur, r * u


def hybrid_attention(q, k, v, *, mesh, **kw):
    """Ulysses over mesh["ulysses"], ring over mesh["ring"]; inputs already validated.
    ``kw``: the options of :func:`~ringattn.strategies.ulysses.usp_attention`."""
    uly, ring = mesh_groups(mesh)
    return usp_attention(q, k, v, ulysses_group=uly, ring=Ring(ring), **kw)
