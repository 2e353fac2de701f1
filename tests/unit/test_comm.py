"""comm.Ring's choice of P2P calls per backend, and what its timers claim, in one process:
torch.distributed's functions are replaced by recorders (no process group needed)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ringattn import comm
from ringattn.comm import Ring, count_comm, p2p_backend


class FakeWork:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def wait(self):
        self.log.append(("wait", self.name))
        return True


class FakeOp:
    """Stands in for dist.P2POp (the real one needs an initialised default group)."""

    def __init__(self, op, tensor, peer, group=None):
        self.op, self.tensor, self.peer, self.group = op, tensor, peer, group


@pytest.fixture
def fake_dist(monkeypatch):
    """Records isend / irecv / batch_isend_irecv calls; the backend name is settable."""
    log: list = []
    state = {"backend": "gloo"}

    def isend(t, dst, group=None):
        log.append(("isend", dst))
        return FakeWork(log, f"isend->{dst}")

    def irecv(t, src, group=None):
        log.append(("irecv", src))
        return FakeWork(log, f"irecv<-{src}")

    def batch(ops):
        kinds = [("isend" if o.op is dist.distributed_c10d.isend else "irecv", o.peer) for o in ops]
        log.append(("batch", kinds))
        return [FakeWork(log, f"batch{i}") for i in range(len(ops))]

    monkeypatch.setattr(dist, "isend", isend)
    monkeypatch.setattr(dist, "irecv", irecv)
    monkeypatch.setattr(dist, "batch_isend_irecv", batch)
    monkeypatch.setattr(dist, "P2POp", FakeOp)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: state["backend"])
    return log, state


def ring(rank: int, world: int) -> Ring:
    r = Ring.local()
    r.rank, r.world = rank, world
    return r


def test_nccl_posts_sends_and_receives_as_one_batch(fake_dist):
    log, state = fake_dist
    state["backend"] = "nccl"
    kv = [torch.ones(2, 3), torch.zeros(2, 3)]
    got = ring(1, 4).exchange(kv, "k/v at forward step 0").wait()
    # one batch: two sends to rank 2, two receives from rank 0; no separate isend/irecv
    assert log[0] == ("batch", [("isend", 2), ("isend", 2), ("irecv", 0), ("irecv", 0)])
    assert [e for e in log if e[0] in ("isend", "irecv")] == []
    assert sum(e[0] == "wait" for e in log) == 4  # every returned work is waited on
    assert [t.shape for t in got] == [(2, 3), (2, 3)]


def test_gloo_keeps_separate_isend_irecv(fake_dist):
    log, state = fake_dist
    state["backend"] = "gloo"
    ring(0, 3).exchange([torch.ones(4)], "k/v", shift=1).wait()
    assert log[:2] == [("isend", 1), ("irecv", 2)]
    assert not any(e[0] == "batch" for e in log)


def test_backend_is_chosen_per_device(fake_dist, monkeypatch):
    log, _ = fake_dist
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    assert p2p_backend(None, torch.device("cpu")) == "gloo"
    assert p2p_backend(None, torch.device("cuda", 0)) == "nccl"
    ring(0, 2).exchange([torch.ones(4)], "k/v").wait()  # CPU tensors: gloo's way
    assert log[:2] == [("isend", 1), ("irecv", 1)]


class SlowWork:
    def wait(self):
        import time

        time.sleep(0.002)  # stands for a transfer the host would block on (gloo)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_wait_time_is_only_claimed_where_the_host_blocks(device):
    """On CPU tensors the host blocks in wait(): that time is communication wait. For device
    tensors (CUDA: wait() only orders streams) host time says nothing, so none is claimed."""
    recv = [torch.empty(3, device=device)]
    with count_comm() as c:
        comm.Pending([SlowWork()], recv, "test").wait()
    if device == "cpu":
        assert c.wait_s > 0.0
    else:
        assert c.wait_s == 0.0


def test_trace_dist_counts_calls_by_kind_and_restores_torch():
    from ringattn.dist_trace import trace_dist

    originals = dist.all_reduce, dist.isend
    fake = {"all_reduce": lambda t, **kw: None, "isend": lambda t, dst, **kw: None}
    with trace_dist(fake=fake) as trace:
        dist.all_reduce(torch.ones(2))
        dist.all_reduce(torch.ones(2, device="meta"))
        dist.isend(torch.ones(3), 1)
    assert dict(trace.calls) == {"all_reduce": 2, "isend": 1}
    assert trace.collectives == {"all_reduce": 2}  # P2P is not a collective
    assert trace.devices == [("all_reduce", "cpu"), ("all_reduce", "meta"), ("isend", "cpu")]
    assert (dist.all_reduce, dist.isend) == originals
