"""Communication as small explicit objects over a process group passed in.

- :class:`Ring`: send to rank+1, receive from rank-1. ``exchange`` posts the transfer and
  returns at once; ``wait`` blocks. No device synchronisation inside, so compute issued
  between the two overlaps the transfer. On NCCL a step's sends and receives are posted as
  one ``batch_isend_irecv``; on gloo as separate isend/irecv (see BATCHED_P2P_BACKENDS).
- :func:`all_gather`, :func:`reduce_scatter`, :func:`all_to_all`: differentiable collectives
  with their autograd written here (``torch.distributed.nn.functional`` gave wrong gradients
  on gloo, see REFERENCE.md).

Every call is counted in the active :func:`count_comm` counters (calls and bytes sent per
rank), which tests assert on and benchmarks report.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class CommError(RuntimeError):
    """A transfer failed or timed out; says which rank, which step and which peer."""


@dataclass
class CommCounter:
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # Host seconds blocked in Pending.wait and blocking collectives on CPU tensors (gloo):
    # communication not hidden by compute. Not counted for device tensors: there wait()
    # only makes the compute stream wait for the communication stream and returns at once,
    # so host time says nothing about blocked time (benchmarks synchronize around a step).
    wait_s: float = 0.0

    def add(self, kind: str, nbytes: int) -> None:
        self.calls[kind] += 1
        self.bytes[kind] += nbytes

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


_COUNTERS: list[CommCounter] = []


@contextlib.contextmanager
def count_comm():
    """Count the communication issued by ringattn inside the block (this rank only)."""
    c = CommCounter()
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


def _record(kind: str, nbytes: int) -> None:
    for c in _COUNTERS:
        c.add(kind, nbytes)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def world_of(group) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _on_host(tensors) -> bool:
    """True when the host blocks until these tensors' transfers are done (CPU tensors)."""
    return all(t.device.type == "cpu" for t in tensors)


def _add_wait(t0: float) -> None:
    for c in _COUNTERS:
        c.wait_s += time.perf_counter() - t0


class Pending:
    """Transfers in flight; ``wait()`` returns the received tensors."""

    def __init__(self, works, recv, where: str):
        self._works, self._recv, self._where = works, recv, where

    def wait(self) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        for w in self._works:
            try:
                w.wait()
            except Exception as e:  # gloo: peer closed or timed out; NCCL: watchdog
                raise CommError(f"{self._where} failed: {e}") from e
        if self._works and _on_host(self._recv):
            _add_wait(t0)
        return self._recv


def p2p_backend(group, device: torch.device) -> str:
    """The backend that carries ``device`` tensors on ``group``: "gloo", "nccl", ... (from
    "nccl", or "cpu:gloo,cuda:nccl" when the group was created with one per device)."""
    name = str(dist.get_backend(group))
    if ":" not in name:
        return name
    per_device = dict(part.split(":", 1) for part in name.split(","))
    return per_device.get(device.type, name)


# Backends that coalesce a batch of P2P operations into one group call. NCCL needs it for a
# ring: separately posted sends may block until the peer posts the matching receive, and
# each lazily created per-pair communicator blocks until both sides join, so W ranks all
# sending first can deadlock. gloo runs a batch op by op anyway (batch_isend_irecv has been
# reported to hang there), so it keeps separate isend/irecv.
BATCHED_P2P_BACKENDS = ("nccl",)


class Ring:
    """One direction of a ring over ``group``: send to rank+1, receive from rank-1."""

    def __init__(self, group=None):
        self.group = group
        self.rank, self.world = world_of(group)

    @classmethod
    def local(cls) -> Ring:
        """A one-rank ring that never communicates, even inside a distributed job."""
        r = cls.__new__(cls)
        r.group, r.rank, r.world = None, 0, 1
        return r

    def _global(self, r: int) -> int:
        r %= self.world
        return dist.get_global_rank(self.group, r) if self.group is not None else r

    def exchange(self, tensors: list[torch.Tensor], what: str = "block", shift: int = 1) -> Pending:
        """Post: send ``tensors`` to rank+shift, receive same-shaped ones from rank-shift."""
        if self.world == 1 or shift % self.world == 0:
            return Pending([], list(tensors), "")
        recv = [torch.empty_like(t) for t in tensors]
        sends = [t.contiguous() for t in tensors]
        dst, src = self._global(self.rank + shift), self._global(self.rank - shift)
        if p2p_backend(self.group, sends[0].device) in BATCHED_P2P_BACKENDS:
            # one batch: every send and receive of this step posted together
            c10d = dist.distributed_c10d  # P2POp wants these very functions
            ops = [dist.P2POp(c10d.isend, t, dst, self.group) for t in sends]
            ops += [dist.P2POp(c10d.irecv, t, src, self.group) for t in recv]
            works = dist.batch_isend_irecv(ops)
        else:
            # isend/irecv pairs (not blocking send-then-recv, which deadlocks around a
            # ring); one work object per op, all waited on
            works = [dist.isend(t, dst, group=self.group) for t in sends]
            works += [dist.irecv(t, src, group=self.group) for t in recv]
        _record(f"ring:{what.split(' at ')[0]}", _nbytes(sends))
        where = f"rank {self.rank}: {what}: receiving from rank {(self.rank - shift) % self.world}"
        return Pending(works, recv, where)


# ----------------------------------------------------------------------------- collectives


# torch 2.13 renamed the tensor collectives; older releases only have the old names.
# Looked up at call time, so ringattn.dist_trace sees these calls like any other.
def _all_gather_single(out, x, **kw):
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, **kw)


def _reduce_scatter_single(out, x, **kw):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, x, **kw)


def _check(where: str, fn, *args, **kw):
    """Run a collective; with CPU tensors (blocking) its duration counts as wait_s."""
    t0 = time.perf_counter()
    try:
        res = fn(*args, **kw)
    except Exception as e:
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise CommError(f"global rank {rank}: {where} failed: {e}") from e
    if not kw.get("async_op") and _on_host(a for a in args if isinstance(a, torch.Tensor)):
        _add_wait(t0)
    return res


def _all_gather_raw(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    _, world = world_of(group)
    if world == 1:
        return x
    x = x.movedim(dim, 0).contiguous()
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    # a ring all-gather forwards W-1 parts of this size: that is what each rank sends
    _record("all_gather", _nbytes([x]) * (world - 1))
    _check("all_gather", _all_gather_single, out, x, group=group)
    return out.movedim(0, dim)


def _reduce_scatter_raw(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    _, world = world_of(group)
    if world == 1:
        return x
    x = x.movedim(dim, 0).contiguous()
    out = torch.empty((x.shape[0] // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _record("reduce_scatter", _nbytes([x]) * (world - 1) // world)
    _check("reduce_scatter", _reduce_scatter_single, out, x, group=group)
    return out.movedim(0, dim)


def _all_to_all_raw(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Split ``x`` into W parts along scatter_dim, send part j to rank j, and concatenate the
    received parts along gather_dim in rank order."""
    _, world = world_of(group)
    if world == 1:
        return x
    parts = [p.contiguous() for p in x.chunk(world, dim=scatter_dim)]
    inp = torch.stack(parts)  # (W, ...part)
    out = torch.empty_like(inp)
    _record("all_to_all", _nbytes([inp]) * (world - 1) // world)
    _check("all_to_all", dist.all_to_all_single, out, inp, group=group)
    return torch.cat(out.unbind(0), dim=gather_dim)


def all_gather_async(x: torch.Tensor, *, group=None, what: str = "all_gather") -> Pending:
    """Post an all-gather of ``x`` (n, ...) along dim 0; ``wait()`` returns [(W*n, ...)].

    Not differentiable: for autograd functions that write their own backward (all-gather
    attention posts this, computes its local block, then waits).
    """
    _, world = world_of(group)
    if world == 1:
        return Pending([], [x], "")
    x = x.contiguous()
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _record(what, _nbytes([x]) * (world - 1))
    work = _check(what, _all_gather_single, out, x, group=group, async_op=True)
    return Pending([work], [out], f"rank {dist.get_rank(group)}: {what}")


def reduce_scatter_async(x: torch.Tensor, *, group=None, what: str = "reduce_scatter") -> Pending:
    """Post a sum-reduce-scatter of ``x`` (W*n, ...) along dim 0; ``wait()`` returns [(n, ...)]
    (this rank's part of the sum over ranks). Not differentiable, like all_gather_async."""
    _, world = world_of(group)
    if world == 1:
        return Pending([], [x], "")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _record(what, _nbytes([x]) * (world - 1) // world)
    work = _check(what, _reduce_scatter_single, out, x, group=group, async_op=True)
    return Pending([work], [out], f"rank {dist.get_rank(group)}: {what}")


def _dual(name: str, fwd: Callable, bwd: Callable) -> type[torch.autograd.Function]:
    """An autograd Function ``(x, dim, group)`` running collective ``fwd`` whose backward is
    its dual ``bwd``: every rank used the whole gathered tensor, so a part's gradient is the
    sum over ranks (all-gather <-> reduce-scatter)."""

    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return fwd(x, dim, group)

    def backward(ctx, g):
        return bwd(g, ctx.dim, ctx.group), None, None

    methods = dict(forward=staticmethod(forward), backward=staticmethod(backward))
    return type(name, (torch.autograd.Function,), methods)


_AllGather = _dual("_AllGather", _all_gather_raw, _reduce_scatter_raw)
_ReduceScatter = _dual("_ReduceScatter", _reduce_scatter_raw, _all_gather_raw)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all_raw(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, g):
        s, gd = ctx.dims
        return _all_to_all_raw(g, gd, s, ctx.group), None, None, None


def all_gather(x: torch.Tensor, *, dim: int = 0, group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order (differentiable)."""
    return _AllGather.apply(x, dim, group)


def reduce_scatter(x: torch.Tensor, *, dim: int = 0, group=None) -> torch.Tensor:
    """Sum over ranks, then keep this rank's 1/W part along ``dim`` (differentiable)."""
    return _ReduceScatter.apply(x, dim, group)


def all_to_all(x: torch.Tensor, *, scatter_dim: int, gather_dim: int, group=None) -> torch.Tensor:
    """Differentiable all-to-all: scatter ``scatter_dim``, gather ``gather_dim``."""
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)
