"""Worker functions for the meta-device initialisation tests (module level: they pickle by
reference)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from ringattn.parallel import ParallelDims, dtensor_box
from ringattn.train.config import Config


def _setup(cfg_dict: dict):
    cfg = Config.from_dict(cfg_dict)
    p = cfg.parallel
    mesh = ParallelDims(p.dp, p.cp, p.tp).build_mesh("cpu")
    return cfg, mesh


def _full(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
    }


def meta_vs_eager_case(cfg_dict: dict) -> dict | None:
    """Every rank builds the parallel model both ways; rank 0 returns both full weights."""
    import torch.distributed as dist

    from ringattn.train.trainer import build_parallel_model

    cfg, mesh = _setup(cfg_dict)
    dev = torch.device("cpu")
    model = build_parallel_model(cfg, mesh, dev, init="meta")[0]
    tied = model.output.weight is model.tok_embeddings.weight  # still shared after to_empty
    meta = _full(model)
    eager = _full(build_parallel_model(cfg, mesh, dev, init="eager")[0])
    return {"meta": meta, "eager": eager, "tied": tied} if dist.get_rank() == 0 else None


class LargestAlloc(TorchDispatchMode):
    """Records the shape of every tensor an op returns (allocations and views alike: an
    over-count, never an under-count of what was allocated). A DTensor op is seen once, at
    the DTensor level (the mode is off while it runs on the shards), so for a DTensor result
    the shape of its local tensor, its only storage, is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, DTensor):
                t = t.to_local()
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.shapes.add(tuple(t.shape))
                self.max_numel = max(self.max_numel, t.numel())
        return out


def local_params(model) -> tuple[int, int, dict[str, tuple]]:
    """(bytes, elements) of this rank's parameter shards, and each parameter's global shape."""
    nbytes = numel = 0
    shapes = {}
    for name, p in model.named_parameters():
        local, shape, _ = dtensor_box(p)
        nbytes += local.numel() * local.element_size()
        numel += local.numel()
        shapes[name] = shape
    return nbytes, numel, shapes


def big_model_case(cfg_dict: dict, real_layers: int) -> dict:
    """Per rank: the full preset by shape only (``init="shapes"``: its per-rank parameter
    bytes), and the same preset cut to ``real_layers`` layers materialised for real under
    :class:`LargestAlloc` (every parameter shape of the preset occurs in it)."""
    from ringattn.train.trainer import build_parallel_model

    cfg, mesh = _setup(cfg_dict)
    model = build_parallel_model(cfg, mesh, torch.device("cpu"), init="shapes")[0]
    full_bytes, _, full_shapes = local_params(model)
    del model
    cut = dict(cfg_dict, model={**cfg_dict["model"], "n_layers": real_layers})
    cfg_cut, _ = _setup(cut)
    with LargestAlloc() as mode:
        model = build_parallel_model(cfg_cut, mesh, torch.device("cpu"), init="meta")[0]
    real_bytes, real_numel, _ = local_params(model)
    local_max = max(dtensor_box(p)[0].numel() for p in model.parameters())
    return {
        "full_bytes": full_bytes,
        "full_shapes": full_shapes,
        "real_bytes": real_bytes,
        "real_numel": real_numel,
        "max_alloc": mode.max_numel,
        "alloc_shapes": mode.shapes,
        "local_max": local_max,
    }
