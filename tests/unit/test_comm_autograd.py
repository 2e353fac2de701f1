"""comm's differentiable collectives on gloo (W = 1..4) against a single-process oracle.

The oracle writes each collective as plain tensor ops on all ranks' inputs at once (cat,
chunk, sum), so its gradient comes from torch autograd, independent of comm's hand-written
backward. Each rank r uses its own input x_r and output gradient g_r: the total loss is
sum_r <g_r, y_r>, and each rank's dx_r must match the oracle's."""

from __future__ import annotations

import pytest
import torch

from tests.dist.cases_cp import async_collective_case, collective_grad_case, collective_inputs


def oracle(spec, world):
    """(y_r, dx_r) for every rank, by autograd on the all-ranks formulation."""
    xs, gs = zip(*(collective_inputs(spec, r, world) for r in range(world)))
    xs = [x.clone().requires_grad_() for x in xs]
    op = spec["op"]
    if op == "all_gather":
        ys = [torch.cat(xs, dim=spec["dim"])] * world
    elif op == "reduce_scatter":
        total = torch.stack(xs).sum(0)
        ys = list(total.chunk(world, dim=spec["dim"]))
    else:  # rank r receives chunk r of every rank's input, concatenated in rank order
        s, g = spec["scatter"], spec["gather"]
        ys = [torch.cat([x.chunk(world, dim=s)[r] for x in xs], dim=g) for r in range(world)]
    loss = sum((y * g).sum() for y, g in zip(ys, gs))
    loss.backward()
    return [y.detach() for y in ys], [x.grad for x in xs]


SPECS = [
    dict(op="all_gather", shape=(2, 3, 5), dim=1),
    dict(op="all_gather", shape=(3, 2), dim=0),
    dict(op="reduce_scatter", shape=(2, 12, 3), dim=1),
    dict(op="reduce_scatter", shape=(12, 2), dim=0),
    dict(op="all_to_all", shape=(2, 3, 12, 4), scatter=2, gather=1),  # sequence -> heads
    dict(op="all_to_all", shape=(2, 12, 3, 4), scatter=1, gather=2),  # and back
]


def expected_bytes(spec, world):
    """What each rank sends, forward then backward (float64 = 8 bytes)."""
    numel = 1
    for d in spec["shape"]:
        numel *= d
    x = numel * 8
    if spec["op"] == "all_gather":  # forwards W-1 parts of x; backward reduce-scatters W x
        return {"all_gather": x * (world - 1)}, {"reduce_scatter": world * x * (world - 1) // world}
    if spec["op"] == "reduce_scatter":
        return {"reduce_scatter": x * (world - 1) // world}, {
            "all_gather": x // world * (world - 1)
        }
    return {"all_to_all": x * (world - 1) // world}, {"all_to_all": x * (world - 1) // world}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s['op']}-{len(s['shape'])}d")
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_collective_gradients(pools, world, spec):
    results = pools(world).run(collective_grad_case, spec)
    ys, dxs = oracle(spec, world)
    fwd, bwd = expected_bytes(spec, world)
    for r, res in enumerate(results):
        torch.testing.assert_close(res["y"], ys[r], rtol=0, atol=1e-12)
        torch.testing.assert_close(res["dx"], dxs[r], rtol=0, atol=1e-12)
        if world == 1:  # nothing travels
            assert res["all"] == ({}, {})
            continue
        assert res["fwd"] == ({k: 1 for k in fwd}, fwd)
        calls, nbytes = res["all"]
        assert calls == {k: 1 for k in {**fwd, **bwd}} or calls == {"all_to_all": 2}
        merged = dict(fwd)
        for k, b in bwd.items():
            merged[k] = merged.get(k, 0) + b
        assert nbytes == merged


@pytest.mark.parametrize("world", [1, 2, 3])
def test_async_collectives(pools, world):
    results = pools(world).run(async_collective_case, {})
    xs = [r["x"] for r in results]
    gathered = torch.cat([x[:3] for x in xs])
    total = torch.stack(xs).sum(0)
    for r, res in enumerate(results):
        torch.testing.assert_close(res["gathered"], gathered)
        torch.testing.assert_close(res["scattered"], total.chunk(world)[r])
        assert res["calls"] == ({} if world == 1 else {"ag": 1, "rs": 1})
