"""The ring schedule and the FLOP count, checked against a brute-force mask count."""

from __future__ import annotations

import pytest
import torch

from ringattn import attention_flops
from ringattn.layouts import LAYOUTS, local_indices
from ringattn.schedule import balance, ring_plan, ring_src, ring_work


def brute_pairs(layout, world, seq, causal):
    """Allowed (query, key) pairs per rank, counted from global positions."""
    out = []
    for r in range(world):
        qp = local_indices(seq, layout, r, world)
        kp = torch.arange(seq)
        m = kp[None, :] <= qp[:, None] if causal else torch.ones(len(qp), seq, dtype=torch.bool)
        out.append(int(m.sum()))
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_schedule_covers_exactly_the_allowed_pairs(layout, world, causal):
    # The schedule never computes a masked-out pair except inside causal diagonal blocks,
    # where the kernel masks; so scheduled pairs == allowed pairs, per rank.
    seq = 2 * world * 6
    flops = attention_flops(layout, world, seq, causal)
    assert [f // 4 for f in flops] == brute_pairs(layout, world, seq, causal)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_each_key_block_pair_is_visited_once(layout, world):
    n = 6
    for r in range(world):
        srcs = [ring_src(r, i, world) for i in range(world)]
        assert sorted(srcs) == list(range(world))
        plan = ring_plan(layout, True, r, world, n)
        assert len(plan) == world and plan[0]  # step 0 (own block) always has work


@pytest.mark.parametrize("world", [2, 3, 4, 8, 16])
def test_zigzag_is_perfectly_balanced(world):
    seq = 2 * world * 64
    f = attention_flops("zigzag", world, seq, True, heads=8, head_dim=64)
    assert max(f) / min(f) == 1.0
    # and every rank does the same work at every step
    n = seq // world
    for step in range(world):
        per_rank = {
            sum(w.pairs(n) for w in ring_work("zigzag", True, r, world, step, n))
            for r in range(world)
        }
        assert len(per_rank) == 1


@pytest.mark.parametrize("world", [2, 4, 8])
def test_contiguous_is_imbalanced_and_skips(world):
    seq = world * 64
    f = attention_flops("contiguous", world, seq, True)
    # the last rank does (2W - 1)x the first rank's diagonal-only work
    assert max(f) / min(f) == pytest.approx(2 * world - 1, rel=0.05)
    # skipped steps are empty work lists, not masked computations
    assert ring_work("contiguous", True, 0, world, 1, 64) == ()


def test_striped_near_balanced_and_diagonal_excluded():
    f = attention_flops("striped", 4, 4 * 256, True)
    assert max(f) / min(f) < 1.01
    w = ring_work("striped", True, 0, 4, 1, 8)  # KV from rank 3 > 0: diagonal excluded
    assert w[0].q == slice(1, 8) and w[0].kv == slice(0, 7) and w[0].causal


def test_backward_flops_are_2_5x():
    f = attention_flops("zigzag", 2, 64, True, backward=True)
    g = attention_flops("zigzag", 2, 64, True)
    assert [a / b for a, b in zip(f, g)] == [2.5, 2.5]


def test_total_causal_flops_match_half_square():
    seq, world = 1024, 4
    total = sum(attention_flops("zigzag", world, seq, True, heads=2, head_dim=8))
    assert total == 4 * 2 * 8 * seq * (seq + 1) // 2


def test_balance_ratios():
    assert balance([1.0, 2.0, 3.0]) == dict(max_over_min=3.0, max_over_mean=1.5)
    assert balance([0, 4])["max_over_min"] == float("inf")  # a rank with no work
    # zigzag balances causal work exactly: every rank the same FLOPs
    assert balance(attention_flops("zigzag", 4, 64, True)) == dict(
        max_over_min=1.0, max_over_mean=1.0
    )
