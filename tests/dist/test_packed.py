"""Layout "packed" (ringattn.balance) through every strategy on real gloo processes, against
the float64 oracle: packed documents shorter than a rank's shard and longer than a whole ring
block, causal and not, GQA, fp32 and bf16, forward and all gradients, exact comm counts."""

from __future__ import annotations

import itertools

import pytest

from tests.dist.cases_cp import raise_cp_case
from tests.dist.pool import RankError
from tests.dist.test_strategies import HEADS, S_LOCAL, make_spec, run_grid

DTYPE_KERNELS = [("fp32", "sdpa"), ("bf16", "blockwise:4")]


def packed_docs(s: int, kind: str) -> list[int]:
    """cu_seqlens of s tokens. "long": documents of 2 and 1 tokens, one of s - 5 (longer
    than a ring block of S_LOCAL, split head-tail), 2 tokens. "short": lengths 3 5 2 7 1 4
    repeated, all shorter than a shard (placed whole; the cut remainder goes to a rank)."""
    if kind == "long":
        return [0, 2, 3, s - 2, s]
    cu, lens = [0], itertools.cycle([3, 5, 2, 7, 1, 4])
    while cu[-1] < s:
        cu.append(min(s, cu[-1] + next(lens)))
    return cu


def packed_grid(strategy: str, world: int, window=None) -> list[dict]:
    """causal x GQA x (long, short documents) x (fp32, bf16): 16 specs."""
    s, h = world * S_LOCAL, HEADS[world]
    specs = []
    for causal, hk, kind, (dtype, kernel) in itertools.product(
        [False, True], [h, 2], ["long", "short"], DTYPE_KERNELS
    ):
        spec = make_spec(strategy, world, "packed", causal, dtype, hk, "none", kernel=kernel)
        spec["cu"] = packed_docs(s, kind)
        if window is not None:
            spec["window"] = window if causal else (window[0], 2)
        specs.append(spec)
    return specs


@pytest.mark.parametrize(
    "strategy, world",
    [("ring", 2), ("ring", 3), ("ring", 4), ("allgather", 2), ("allgather", 4), ("ulysses", 2)],
)
def test_packed_grid(pools, strategy, world):
    run_grid(pools, world, packed_grid(strategy, world))


def test_packed_grid_hybrid_2x2(pools):
    run_grid(pools, 4, packed_grid("hybrid", 4))


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_packed_with_window(pools, strategy):
    run_grid(pools, 4, packed_grid(strategy, 4, window=(5, 0))[::2])


@pytest.mark.parametrize("world", [2, 3])
def test_packed_unshard_round_trip_and_gradient(pools, world):
    import torch

    import ringattn
    from tests.dist.cases import unshard_case

    s = 8 * world
    cu = packed_docs(s, "long")
    res = pools(world).run(unshard_case, dict(s=s, layout="packed", cu=cu))
    x, w = res[0]["x"], res[0]["w"]
    coef = sum(r + 1 for r in range(world))  # d/d(local) of sum_r (r+1) * <full, w>
    for r, out in enumerate(res):
        assert torch.equal(out["full"], x)
        want = ringattn.shard(w * coef, "packed", rank=r, world_size=world, cu_seqlens=cu)
        assert torch.allclose(out["grad"], want, rtol=1e-6, atol=1e-6)


def test_packed_without_documents_raises_on_every_rank(pools):
    with pytest.raises(RankError) as ei:
        pools(2).run(raise_cp_case, dict(kw=dict(strategy="ring", layout="packed")))
    errs = ei.value.errors
    assert set(errs) == {0, 1}
    assert all("layout='packed'" in m and "cu_seqlens" in m for _, m, _ in errs.values())


# ----------------------------------------------------------------------------- trainer


@pytest.mark.parametrize(
    "parallel",
    [{"cp": 4, "strategy": "ring"}, {"cp": 4, "strategy": "hybrid", "ulysses": 2}],
    ids=["ring", "hybrid_2x2"],
)
def test_trainer_packed_layout_matches_one_process(pools, tmp_path, parallel):
    """parallel.layout='packed' on packed text: each row sharded by its own documents."""
    from tests.dist.cases_train import reference_run
    from tests.dist.test_train import _assert_same, _fit, _text_cfg

    cfg = _text_cfg(tmp_path, layout="packed", **parallel)
    _assert_same(_fit(pools, cfg), reference_run(cfg))
