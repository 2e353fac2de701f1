"""Record every ``torch.distributed`` call made in this process: which function, how often,
and on which device each tensor argument lives.

:func:`ringattn.count_comm` counts what ringattn itself sends; this sees everything that goes
through the ``torch.distributed`` namespace (FSDP, the trainer's reductions, input checks),
so benchmarks can report collectives per training step by kind and tests can assert that a
hot path issues none, or that no CPU tensor reaches an NCCL collective.

Calls are wrapped by name in the ``torch.distributed`` namespace for the duration of the
block. Calls that torch makes internally between its own functions (``all_gather_object``
calling ``all_gather``) go through module globals and are not counted twice. ``fake``
replaces the real functions (single-process tests of code paths written for NCCL).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["P2P", "DistTrace", "trace_dist"]

# Point-to-point functions; every other traced function is a collective (or a barrier).
P2P = frozenset({"isend", "irecv", "send", "recv", "batch_isend_irecv"})

_TRACED = (
    *sorted(P2P),
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "barrier",
    "monitored_barrier",
)


@dataclass
class DistTrace:
    calls: Counter = field(default_factory=Counter)  # function name -> number of calls
    # (function name, device type) for every tensor argument, P2POp tensors included
    devices: list[tuple[str, str]] = field(default_factory=list)

    @property
    def collectives(self) -> dict[str, int]:
        """The non-P2P calls by function name."""
        return {k: n for k, n in self.calls.items() if k not in P2P}

    def record(self, name: str, args, kwargs) -> None:
        self.calls[name] += 1
        for t in _tensors([*args, *kwargs.values()]):
            self.devices.append((name, t.device.type))


def _tensors(values):
    for x in values:
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            yield from _tensors(x)
        elif isinstance(x, dist.P2POp):
            yield x.tensor


@contextlib.contextmanager
def trace_dist(fake: dict | None = None):
    """Within the block, every ``torch.distributed.<fn>`` in :data:`_TRACED` is recorded in
    the yielded :class:`DistTrace`, then runs as usual, or as ``fake[name]`` when given."""
    trace = DistTrace()
    saved = {name: getattr(dist, name) for name in _TRACED if hasattr(dist, name)}
    fake = fake or {}

    def wrap(name, fn):
        def traced(*args, **kwargs):
            trace.record(name, args, kwargs)
            return fn(*args, **kwargs)

        return traced

    try:
        for name, fn in saved.items():
            setattr(dist, name, wrap(name, fake.get(name, fn)))
        yield trace
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
