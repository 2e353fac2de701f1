"""Ring attention on real gloo processes against the float64 oracle."""

from __future__ import annotations

import pytest
import torch

from tests.dist.cases import raise_case, ring_case
from tests.dist.common import check_against_oracle
from tests.dist.pool import Pool, RankError

LAYOUTS = ["contiguous", "zigzag", "striped"]
WORLDS = [1, 2, 3, 4, 8]


def spec_for(world, layout, causal, **kw):
    # 4 tokens per rank by default (two zigzag chunks of 2): enough to cross every branch
    s_local = kw.pop("s_local", 4)
    base = dict(
        b=2,
        s=world * s_local,
        h=4,
        hk=2,
        d=16,
        dtype="fp32",
        layout=layout,
        causal=causal,
        seed=world * 7 + len(layout) + int(causal),
    )
    base.update(kw)
    return base


def run_and_check(pools, world, spec):
    results = pools(world).run(ring_case, spec)
    return results, check_against_oracle(spec, results)


@pytest.mark.parametrize("kernel", ["sdpa", "blockwise:3"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", WORLDS)
def test_world_layout_causal(pools, world, layout, causal, kernel):
    run_and_check(pools, world, spec_for(world, layout, causal, kernel=kernel))


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [2, 3])
def test_heads_and_head_dim(pools, world, layout, heads, head_dim):
    h, hk = heads
    spec = spec_for(world, layout, True, h=h, hk=hk, d=head_dim, s_local=6, b=1)
    results, _ = run_and_check(pools, world, spec)
    # GQA/MQA: K/V travel with h_kv heads, never repeated
    per_step = 2 * spec["b"] * 6 * hk * head_dim * 4
    assert results[0]["bytes"]["ring:k/v"] == per_step * 2 * (world - 1)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("kernel", ["sdpa", "blockwise:4"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [2, 4])
def test_low_precision(pools, world, layout, kernel, dtype):
    spec = spec_for(world, layout, True, dtype=dtype, kernel=kernel, s_local=8, d=32)
    results, _ = run_and_check(pools, world, spec)
    assert results[0]["out_dtype"].is_floating_point and str(results[0]["out_dtype"]).endswith(
        {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    )
    assert str(results[0]["lse"].dtype) == "torch.float32"


@pytest.mark.parametrize("world", [2, 4])
def test_float64_exact(pools, world):
    spec = spec_for(world, "zigzag", True, dtype="fp64", kernel="blockwise:3")
    run_and_check(pools, world, spec)


@pytest.mark.parametrize(
    "extra",
    [
        dict(scale=0.3),
        dict(q_scale=10.0),  # peaked logits: |s| ~ 100, must not overflow
        dict(noncontig=True),
        dict(b=3),
        dict(d=17),
    ],
    ids=["scale", "peaked", "noncontig", "batch3", "odd_d"],
)
@pytest.mark.parametrize("world", [3, 8])
def test_options(pools, world, extra):
    run_and_check(pools, world, spec_for(world, "zigzag", True, **extra))


@pytest.mark.parametrize("world", [5])
def test_world_five(pools, world):
    for layout in LAYOUTS:
        run_and_check(pools, world, spec_for(world, layout, True, kernel="sdpa"))


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_collective_counts(pools, world):
    spec = spec_for(world, "zigzag", True)
    results, _ = run_and_check(pools, world, spec)
    for r in results:
        # forward: W-1 K/V exchanges (2 tensors each); one metadata all-gather (a new
        # signature's input check)
        assert r["fwd_calls"] == {"check": 1, "ring:k/v": world - 1}
        # backward: W-1 more K/V exchanges and W dK/dV hops (the last one goes home)
        assert r["calls"] == {"check": 1, "ring:k/v": 2 * (world - 1), "ring:dk/dv": world}


def test_mismatched_lengths_raise_everywhere(pools):
    with pytest.raises(RankError) as ei:
        pools(3).run(raise_case, dict(s_local=4, longer_on=(1,), layout="contiguous"))
    errs = ei.value.errors
    assert set(errs) == {0, 1, 2}  # every rank raised: nobody hangs
    assert all(t == "ValueError" for t, _, _ in errs.values())
    assert all("disagree" in m and "rank 1" in m for _, m, _ in errs.values())
    # each number is labelled with its field, and only the differing fields are listed
    assert all("on local seq (rank 0: 4, rank 1: 5);" in m for _, m, _ in errs.values())


def test_one_rank_bad_heads_raises_everywhere(pools):
    with pytest.raises(RankError) as ei:
        pools(2).run(raise_case, dict(s_local=4, bad_heads_on=(1,)))
    errs = ei.value.errors
    assert "multiple of k/v heads" in errs[1][1]
    assert "rank(s) [1]" in errs[0][1]


def test_odd_zigzag_length_names_the_fix(pools):
    with pytest.raises(RankError) as ei:
        pools(2).run(raise_case, dict(s_local=3))
    assert all("zigzag" in m and "even" in m for _, m, _ in ei.value.errors.values())


def test_failing_rank_does_not_hang_the_others():
    from tests.dist.cases import die_case

    pool = Pool(2, pg_timeout=5.0)
    try:
        with pytest.raises(RankError) as ei:
            pool.run(die_case, dict(victim=1), timeout=60)
        errs = ei.value.errors
        assert "simulated failure" in errs[1][1]
        # the survivor gets an error naming its rank, the step and the peer, not a hang
        assert errs[0][0] == "CommError"
        assert "rank 0" in errs[0][1] and "forward step 0" in errs[0][1]
    finally:
        pool.close()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_unshard_round_trip_and_gradient(pools, world, layout):
    import ringattn
    from tests.dist.cases import unshard_case

    s = 4 * world
    res = pools(world).run(unshard_case, dict(s=s, layout=layout))
    x, w = res[0]["x"], res[0]["w"]
    coef = sum(r + 1 for r in range(world))  # d/d(local) of sum_r (r+1) * <full, w>
    for r, out in enumerate(res):
        assert torch.equal(out["full"], x)
        want = ringattn.shard(w * coef, layout, rank=r, world_size=world)
        assert torch.allclose(out["grad"], want, rtol=1e-6, atol=1e-6)


def test_second_call_with_the_same_signature_issues_no_collective(pools):
    from tests.dist.cases import repeat_case

    for first, second in pools(2).run(repeat_case, {}):
        calls, collectives, counted = first
        # the first call checks its inputs once: one all-gather, counted as "check"
        assert collectives == {"all_gather_single": 1}
        assert counted["check"] == 1
        calls, collectives, counted = second
        assert collectives == {}  # nothing but the ring's P2P
        assert "check" not in counted
        assert set(calls) <= {"isend", "irecv", "batch_isend_irecv"}


@pytest.mark.parametrize("change", ["length", "heads"])
def test_late_mismatch_on_one_rank_raises_everywhere_instead_of_hanging(change):
    """Rank 1 alone changes its inputs after a signature was agreed: it checks, rank 0
    skips. Both must raise (at the group timeout), never compute on mismatched shapes or
    hang; a rank whose own inputs are bad raises its own error."""
    from tests.dist.cases import late_mismatch_case

    pool = Pool(2, pg_timeout=5.0)
    try:
        with pytest.raises(RankError) as ei:
            pool.run(late_mismatch_case, {"change": change}, timeout=60)
        errs = ei.value.errors
        assert set(errs) == {0, 1}
        if change == "length":
            assert errs[1][0] == "CommError" and "metadata exchange failed" in errs[1][1]
        else:
            assert errs[1][0] == "ValueError" and "multiple of k/v heads" in errs[1][1]
        assert errs[0][0] == "CommError" and "forward step 0" in errs[0][1]
    finally:
        pool.close()
