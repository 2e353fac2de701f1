"""Code paths written for NCCL, run in one process on CPU.

torch.distributed is faked: a 2-rank world on an "nccl" backend whose functions record what
they are given (``ringattn.dist_trace``). Tensors live on a device without values: "meta"
stands for the GPU where slicing is needed (fake CUDA tensors cannot be sliced on a
CPU-only build), fake CUDA tensors (FakeTensorMode) elsewhere. Any host sync in the path
(``.item()``, ``.cpu()`` of a result, boolean indexing) raises there, and every tensor that
reaches a collective can be checked to live on that device, not on the CPU where NCCL
cannot take it.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import ringattn
from ringattn.dist_trace import trace_dist
from ringattn.validate import clear_checked


class FakeWork:
    def wait(self):
        return True


class FakeOp:
    def __init__(self, op, tensor, peer, group=None):
        self.op, self.tensor, self.peer, self.group = op, tensor, peer, group


@pytest.fixture
def fake_world(monkeypatch):
    """Rank 0 of 2; ``state["backend"]`` is what dist.get_backend answers."""
    state = {"backend": "nccl"}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: state["backend"])
    monkeypatch.setattr(dist, "get_global_rank", lambda group, r: r)
    monkeypatch.setattr(dist, "P2POp", FakeOp)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    clear_checked()
    yield state
    clear_checked()


def _all_gather_equal_rows(out, x, group=None, async_op=False):
    out.copy_(x.repeat(out.numel() // x.numel()))  # every rank sent the same row


FAKES = dict(
    all_gather_single=_all_gather_equal_rows,
    all_gather_into_tensor=_all_gather_equal_rows,
    all_reduce=lambda t, op=None, group=None, async_op=False: None,
    isend=lambda t, dst, group=None: FakeWork(),
    irecv=lambda t, src, group=None: FakeWork(),
    batch_isend_irecv=lambda ops: [FakeWork() for _ in ops],
)


def test_ring_attention_on_nccl_keeps_every_transfer_on_the_gpu(fake_world):
    """Forward and backward of ring attention on a value-less device in a fake NCCL world:
    batched P2P only, every tensor on that device, no collective and no host sync."""
    shape_q, shape_kv = (1, 8, 4, 16), (1, 8, 2, 16)
    kw = dict(causal=True, layout="zigzag", kernel="blockwise")
    # the signature is agreed once (real values; gloo), as a first call does
    fake_world["backend"] = "gloo"
    with trace_dist(fake=FAKES):
        q, k = torch.randn(shape_q), torch.randn(shape_kv)
        ringattn.ring_attention(q, k, k, **kw)
    fake_world["backend"] = "nccl"
    with trace_dist(fake=FAKES) as trace:
        q = torch.empty(shape_q, device="meta", requires_grad=True)
        k = torch.empty(shape_kv, device="meta", requires_grad=True)
        v = torch.empty(shape_kv, device="meta", requires_grad=True)
        out = ringattn.ring_attention(q, k, v, **kw)
        out.sum().backward()
    assert out.device.type == "meta" and k.grad.shape == shape_kv
    assert trace.collectives == {}
    # W=2: forward 1 K/V hop, backward 1 K/V hop and 2 dK/dV hops, each one batch
    assert dict(trace.calls) == {"batch_isend_irecv": 4}
    assert {dev for _, dev in trace.devices} == {"meta"}


def test_input_check_metadata_goes_on_the_gpu_with_nccl(fake_world):
    fakes = {**FAKES, "all_gather_single": lambda out, x, group=None: None}
    with trace_dist(fake=fakes) as trace, FakeTensorMode():
        q = torch.empty(1, 8, 4, 16, device="cuda")
        # the check's verdict needs the gathered values (the one host sync of a new
        # signature), which fake tensors do not have: it raises after the all-gather
        with pytest.raises(Exception):  # noqa: B017
            ringattn.ring_attention(q, q, q, causal=True, layout="zigzag", kernel="blockwise")
    assert trace.devices == [("all_gather_single", "cuda")] * 2


def test_clip_without_local_gradients_reduces_on_the_gpu(fake_world):
    from ringattn.train.optim import clip_grad_norm

    p = torch.nn.Parameter(torch.ones(3))  # no .grad on this rank
    with trace_dist(fake=FAKES) as trace, FakeTensorMode():
        with pytest.raises(Exception):  # noqa: B017
            clip_grad_norm([p], 1.0)  # float(norm), the logged value, has no value here
    assert trace.devices == [("all_reduce", "cuda")]


def test_init_distributed_binds_the_group_to_the_device(monkeypatch):
    from ringattn import launch

    log = []
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: log.append(("set_device", d)))
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend, **kw: log.append(("init", backend, kw))
    )
    rank, world, device = launch.init_distributed(device="cuda")
    assert (rank, world, device) == (3, 4, torch.device("cuda", 3))
    assert log[0] == ("set_device", torch.device("cuda", 3))  # the device first
    assert log[1][:2] == ("init", "nccl")
    assert log[1][2]["device_id"] == torch.device("cuda", 3)


class HostToDevice(TorchDispatchMode):
    """Counts copies from a CPU tensor to another device."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            dst = torch.device(kwargs.get("device") or args[0].device)
            self.n += args[0].device.type == "cpu" and dst.type != "cpu"
        elif func is torch.ops.aten.copy_.default:
            self.n += args[1].device.type == "cpu" and args[0].device.type != "cpu"
        return func(*args, **kwargs)


def test_ulysses_permutation_is_not_copied_to_the_device_per_call(monkeypatch):
    """Zigzag over 2 Ulysses ranks needs a re-permutation: built and moved to the device
    once, then reused (it used to be copied from the host on every call)."""
    import ringattn.comm as comm
    import ringattn.strategies.ulysses as uly
    from ringattn.kernels import get_kernel

    world_of = lambda g: (0, 2) if g == "U" else (0, 1)  # noqa: E731
    monkeypatch.setattr(comm, "world_of", world_of)
    monkeypatch.setattr(uly, "world_of", world_of)
    monkeypatch.setattr(dist, "all_to_all_single", lambda out, x, group=None: out.copy_(x))
    q, k = torch.empty(1, 8, 4, 8, device="meta"), torch.empty(1, 8, 2, 8, device="meta")
    kern = get_kernel("blockwise", q.device, q.dtype)
    kw = dict(scale=0.3, causal=True, layout="zigzag", cu=None, window=None, kernel=kern)
    copies = []
    for _ in range(2):
        with HostToDevice() as c:
            out, _ = uly.usp_attention(q, k, k, ulysses_group="U", ring=comm.Ring.local(), **kw)
        copies.append(c.n)
    assert out.shape == q.shape
    assert copies[1] == 0, copies
