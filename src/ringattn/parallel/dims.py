"""ParallelDims: the three degrees (dp, cp, tp) and the one DeviceMesh built from them.

Rank layout is row-major over ``(dp, cp, tp)``: tp is the fastest-varying dimension, so the
ranks of one tensor-parallel group are neighbours (on GPUs: the same node, NVLink), then the
context-parallel ring, then data parallelism. Example, dp = cp = tp = 2 (8 ranks)::

    rank   0  1  2  3  4  5  6  7
    dp     0  0  0  0  1  1  1  1
    cp     0  0  1  1  0  0  1  1
    tp     0  1  0  1  0  1  0  1

FSDP shards parameters over the flattened ``dp_cp`` dimension (cp ranks hold different
tokens of the same sequences, so for the optimizer they are data parallel), and the loss is
reduced over ``dp_cp`` too; tp ranks hold the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["ParallelDims", "ParallelMesh"]


@dataclass(frozen=True)
class ParallelMesh:
    """The ``root`` mesh and its views: ``mesh["dp"]``, ``["cp"]``, ``["tp"]``, the
    flattened ``["dp_cp"]`` and, when cp is split for the hybrid strategy, the 2-D
    ``["ring", "ulysses"]`` mesh as ``.hybrid`` (flattened meshes are kept here: slicing
    them from the root is deprecated)."""

    root: DeviceMesh
    cp: DeviceMesh
    dp_cp: DeviceMesh
    hybrid: DeviceMesh | None = None

    def __getitem__(self, name: str) -> DeviceMesh:
        if name in ("cp", "dp_cp"):
            return getattr(self, name)
        return self.root[name]


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of data, context and tensor parallelism; ``dp * cp * tp`` is the world size."""

    dp: int = 1
    cp: int = 1
    tp: int = 1
    ulysses: int = 1  # hybrid strategy only: cp = ring x ulysses, Ulysses inside

    def __post_init__(self) -> None:
        for name in ("dp", "cp", "tp", "ulysses"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ParallelDims.{name} must be >= 1, got {getattr(self, name)}")
        if self.cp % self.ulysses:
            raise ValueError(
                f"ParallelDims: ulysses ({self.ulysses}) must divide cp ({self.cp}); the hybrid "
                "strategy runs cp / ulysses ring steps over groups of ulysses ranks"
            )

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp

    @property
    def dp_cp(self) -> int:
        """Ranks that hold different tokens: the FSDP and loss-reduction degree."""
        return self.dp * self.cp

    def check_world(self, world_size: int) -> None:
        if self.world_size != world_size:
            raise ValueError(
                f"dp * cp * tp = {self.dp} * {self.cp} * {self.tp} = {self.world_size} but "
                f"the job has {world_size} ranks; set the degrees so that their product is "
                "the number of ranks (e.g. --parallel.dp=... --parallel.cp=...)"
            )

    def build_mesh(self, device_type: str = "cpu") -> ParallelMesh:
        """One 3-D mesh ``("dp", "cp", "tp")`` plus the flattened ``"dp_cp"`` dimension.

        Needs the default process group; get 1-D meshes with ``mesh["cp"]``, ``mesh["tp"]``,
        ``mesh["dp_cp"]`` and process groups with ``mesh["cp"].get_group()``.
        """
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.check_world(world)
        if self.ulysses == 1:
            root = init_device_mesh(
                device_type, (self.dp, self.cp, self.tp), mesh_dim_names=("dp", "cp", "tp")
            )
            return ParallelMesh(root, root["cp"], root["dp", "cp"]._flatten("dp_cp"))
        # cp split as (ring, ulysses), row-major: cp rank = ring_rank * ulysses + uly_rank,
        # the order ringattn's hybrid strategy expects the layout shards in
        shape = (self.dp, self.cp // self.ulysses, self.ulysses, self.tp)
        root = init_device_mesh(device_type, shape, mesh_dim_names=("dp", "ring", "ulysses", "tp"))
        return ParallelMesh(
            root,
            cp=root["ring", "ulysses"]._flatten("cp"),
            dp_cp=root["dp", "ring", "ulysses"]._flatten("dp_cp"),
            hybrid=root["ring", "ulysses"],
        )

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of global ``rank`` in the mesh (pure; matches :meth:`build_mesh`)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside [0, {self.world_size})")
        return {
            "dp": rank // (self.cp * self.tp),
            "cp": (rank // self.tp) % self.cp,
            "tp": rank % self.tp,
        }
