"""Worker-side functions for the context-parallel strategies (module level: they pickle by
reference). A spec is a dict like tests/dist/cases.py's, plus strategy, cu, window, mesh."""

from __future__ import annotations

import torch
import torch.distributed as dist

import ringattn
from ringattn.strategies import hybrid_rank
from ringattn.validate import clear_checked
from tests.dist.cases import _kernel, make_inputs

_MESHES: dict = {}


def mesh_for(shape: tuple[int, ...], names: tuple[str, ...]):
    """One DeviceMesh per (shape, names) per worker: building one creates process groups."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (tuple(shape), tuple(names))
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh("cpu", tuple(shape), mesh_dim_names=tuple(names))
    return _MESHES[key]


def _cp_rank(spec):
    """(cp rank, W, extra kwargs): the shard this rank holds and how to call."""
    if spec["strategy"] == "hybrid":
        mesh = mesh_for(*spec.get("mesh", ((2, 2), ("ring", "ulysses"))))
        rank, world = hybrid_rank(mesh)
        return rank, world, {"mesh": mesh}
    return dist.get_rank(), dist.get_world_size(), {}


def cp_case(spec: dict) -> dict:
    clear_checked()  # every rank: this case's first call runs its input check (counted)
    """Forward and backward of one spec; outputs, gradients and per-phase comm counts."""
    rank, world, kw = _cp_rank(spec)
    q, k, v, dout = make_inputs(spec)
    layout = spec["layout"]
    cu = spec.get("cu")  # layout "packed" is built from the documents
    sh = lambda x: ringattn.shard(x, layout, rank=rank, world_size=world, cu_seqlens=cu).clone()
    ql, kl, vl = (sh(t).requires_grad_() for t in (q, k, v))
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    with ringattn.count_comm() as counter:
        out, lse = ringattn.context_parallel_attention(
            ql,
            kl,
            vl,
            strategy=spec["strategy"],
            causal=spec["causal"],
            softmax_scale=spec.get("scale"),
            layout=layout,
            cu_seqlens=cu,
            window=spec.get("window"),
            return_lse=True,
            kernel=_kernel(spec),
            **kw,
        )
        fwd = (dict(counter.calls), dict(counter.bytes))
        out.backward(sh(dout))
    return {
        "cp_rank": rank,
        "out": out.detach(),
        "lse": lse,
        "dq": ql.grad,
        "dk": kl.grad,
        "dv": vl.grad,
        "fwd_calls": fwd[0],
        "fwd_bytes": fwd[1],
        "calls": dict(counter.calls),
        "bytes": dict(counter.bytes),
        "out_dtype": out.dtype,
        "out_shape": tuple(out.shape),
    }


def cp_batch(specs: list[dict]) -> list[dict]:
    """Many specs in one round trip to the pool (the cases are tiny; the trip is not)."""
    return [cp_case(s) for s in specs]


def raise_cp_case(spec: dict):
    """Calls context_parallel_attention with the spec's (bad) arguments on some ranks."""
    clear_checked()
    rank, world = dist.get_rank(), dist.get_world_size()
    n, h, hk = spec.get("s_local", 4), spec.get("h", 4), spec.get("hk", 2)
    q, k = torch.randn(1, n, h, 8), torch.randn(1, n, hk, 8)
    kw = dict(spec.get("kw", {}))
    if rank in spec.get("bad_on", range(world)):
        kw.update(spec.get("bad", {}))
    if "cu" in kw:
        kw["cu_seqlens"] = torch.tensor(kw.pop("cu"), dtype=torch.int32)
    if "mesh" in kw:
        kw["mesh"] = mesh_for(*kw["mesh"])
    return ringattn.context_parallel_attention(q, k, k.clone(), **kw)


def collective_grad_case(spec: dict) -> dict:
    """Gradients of comm's differentiable collectives on this rank's deterministic input."""
    from ringattn.comm import all_gather, all_to_all, reduce_scatter

    rank, world = dist.get_rank(), dist.get_world_size()
    x, g = collective_inputs(spec, rank, world)
    x.requires_grad_()
    op = spec["op"]
    with ringattn.count_comm() as c:
        if op == "all_gather":
            y = all_gather(x, dim=spec["dim"])
        elif op == "reduce_scatter":
            y = reduce_scatter(x, dim=spec["dim"])
        else:
            y = all_to_all(x, scatter_dim=spec["scatter"], gather_dim=spec["gather"])
        fwd = dict(c.calls), dict(c.bytes)
        y.backward(g)
    return {"y": y.detach(), "dx": x.grad, "fwd": fwd, "all": (dict(c.calls), dict(c.bytes))}


def collective_inputs(spec: dict, rank: int, world: int):
    """Rank ``rank``'s input x and output gradient g, (shape) and (output shape), float64."""
    gen = torch.Generator().manual_seed(100 * rank + spec.get("seed", 0))
    shape = list(spec["shape"])
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    out_shape = list(shape)
    op = spec["op"]
    if op == "all_gather":
        out_shape[spec["dim"]] *= world
    elif op == "reduce_scatter":
        out_shape[spec["dim"]] //= world
    else:
        out_shape[spec["scatter"]] //= world
        out_shape[spec["gather"]] *= world
    g = torch.randn(*out_shape, generator=gen, dtype=torch.float64)
    return x, g


def async_collective_case(spec: dict) -> dict:
    """comm.all_gather_async / reduce_scatter_async results on deterministic inputs."""
    from ringattn.comm import all_gather_async, reduce_scatter_async

    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(3 * world, 2, generator=gen)
    with ringattn.count_comm() as c:
        (gathered,) = all_gather_async(x[:3], what="ag").wait()
        (scattered,) = reduce_scatter_async(x, what="rs").wait()
    return {"x": x, "gathered": gathered, "scattered": scattered, "calls": dict(c.calls)}


def rows_case(spec: dict) -> dict:
    """A batch whose rows have documents of their own, in one call (a list of cu_seqlens)
    and row by row; float64, so the two must agree to rounding."""
    rank, world = dist.get_rank(), dist.get_world_size()
    clear_checked()
    layout, cus = spec["layout"], spec["cus"]
    b, s = len(cus), spec["s"]
    g = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(b, s, 4, 8, generator=g, dtype=torch.float64) for _ in range(4))

    def sh(x):  # each row by its own documents (only "packed" depends on them)
        rows = [
            ringattn.shard(x[i : i + 1], layout, rank=rank, world_size=world, cu_seqlens=c)
            for i, c in enumerate(cus)
        ]
        return torch.cat(rows).clone()

    kw = dict(strategy=spec["strategy"], causal=True, layout=layout, return_lse=True)
    kw["window"] = spec.get("window")
    res = {}
    for mode in ("batch", "rows"):
        ql, kl, vl = (sh(t).requires_grad_() for t in (q, k, v))
        cu = [torch.tensor(c, dtype=torch.int32) for c in cus]
        with ringattn.count_comm() as counter:
            if mode == "batch":
                out, lse = ringattn.context_parallel_attention(ql, kl, vl, cu_seqlens=cu, **kw)
            else:
                pairs = [
                    ringattn.context_parallel_attention(
                        ql[i : i + 1], kl[i : i + 1], vl[i : i + 1], cu_seqlens=cu[i], **kw
                    )
                    for i in range(b)
                ]
                out, lse = (torch.cat(t) for t in zip(*pairs))
            out.backward(sh(dout))
        res[mode] = dict(out=out.detach(), lse=lse, dq=ql.grad, dk=kl.grad, dv=vl.grad)
        res[mode]["calls"] = dict(counter.calls)
    return res
