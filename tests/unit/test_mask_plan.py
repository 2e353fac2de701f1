"""The pure mask planner: exact coverage of the allowed pairs, skipping, tight boxes,
truncated rings, FLOP counts; plus positions with documents and the argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ringattn
from ringattn.cp import check_cu_seqlens, check_window
from ringattn.layouts import local_indices, positions
from ringattn.mask_plan import (
    block_works,
    group_positions,
    mask_flops,
    plan_flops,
    ring_mask_plan,
    window_steps,
)
from ringattn.schedule import attention_flops, ring_plan
from tests.oracle import allowed_mask, naive_attention

LAYOUTS = ["contiguous", "zigzag", "striped"]


def norm(plan, n):
    return [[(w.q.indices(n), w.kv.indices(n), w.causal, w.mask is None) for w in s] for s in plan]


def doc_ids(cu, pos):
    return None if cu is None else torch.bucketize(pos, torch.tensor(cu[1:]), right=True)


def oracle(pos_q, pos_k, causal, cu, window):
    return allowed_mask(
        pos_q,
        pos_k,
        causal=causal,
        q_doc=doc_ids(cu, pos_q),
        k_doc=doc_ids(cu, pos_k),
        window=window,
    )


def computed(works, nq, nk) -> torch.Tensor:
    """(nq, nk) int: how many times the works compute each allowed pair."""
    got = torch.zeros(nq, nk, dtype=torch.int)
    for w in works:
        lq, lk = len(range(*w.q.indices(nq))), len(range(*w.kv.indices(nk)))
        sub = torch.ones(lq, lk, dtype=torch.bool)
        if w.mask is not None:
            sub = w.mask.dense()
        elif w.causal:
            assert lq == lk, "causal only on square boxes"
            sub = sub.tril()
        got[w.q, w.kv] += sub.int()
    return got


# ----------------------------------------------------------------------------- plans


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_the_ring_schedule_without_masks(layout, world, causal):
    """The general planner, run on plain causal / full blocks, finds the schedule's plan
    (ring_mask_plan then takes the schedule's shortcut for unmasked rings)."""
    for n in (4, 6):
        pos = [local_indices(world * n, layout, r, world) for r in range(world)]
        for r in range(world):
            got = [block_works(pos[r], pos[(r - i) % world], causal=causal) for i in range(world)]
            assert norm(got, n) == norm(ring_plan(layout, causal, r, world, n), n)
            assert ring_mask_plan(layout, world, r, n, causal=causal) == ring_plan(
                layout, causal, r, world, n
            )


@st.composite
def mask_cases(draw):
    layout = draw(st.sampled_from(LAYOUTS))
    world = draw(st.integers(1, 5))
    group = draw(st.sampled_from([1, 2])) if world % 2 == 0 else 1
    n = draw(st.sampled_from([2, 4, 6, 8]))
    s = world * n
    causal = draw(st.booleans())
    cu = None
    if draw(st.booleans()) and s > 1:
        inner = draw(st.sets(st.integers(1, s - 1), max_size=5))
        cu = tuple(sorted({0, s} | inner))
    window = None
    if draw(st.booleans()):
        left = draw(st.integers(-1, s))
        right = 0 if causal else draw(st.integers(-1, s))
        window = (left, right)
    return layout, world, group, n, causal, cu, window


@settings(max_examples=150, deadline=None, derandomize=True)
@given(mask_cases())
def test_every_allowed_pair_computed_exactly_once(case):
    """Ring plans (and hybrid rings: ``group`` shards per ring rank) cover exactly the oracle's
    allowed pairs, each once; steps past T hold nothing; boxes are tight."""
    layout, world, group, n, causal, cu, window = case
    ring = world // group
    s = world * n
    pos = [group_positions(s, layout, world, group, r) for r in range(ring)]
    for r in range(ring):
        plan = ring_mask_plan(
            layout, ring, r, n * group, causal=causal, cu=cu, window=window, group=group
        )
        for i in range(ring):
            ref = oracle(pos[r], pos[(r - i) % ring], causal, cu, window).int()
            works = plan[i] if i < len(plan) else ()
            assert torch.equal(computed(works, n * group, n * group), ref), (r, i, plan)
            for w in works:  # tight: first/last rows and columns of a box hold a pair
                box = ref[w.q, w.kv]
                assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()


def test_documents_skip_blocks_and_shrink_boxes():
    """Contiguous, causal, W = 4, 8 tokens per rank, documents [0,3) [3,5) [5,20) [20,32).
    Rank 3 (tokens 24..31, all in the last document) needs only keys 20..23 of rank 2: one
    full 8 x 4 box; rank 1 holds nothing it may see, so that step is skipped, and no rank
    needs keys from 3 ranks back (rank 2 reaches rank 0's tokens 5..7), so T = 3, not 4."""
    cu = (0, 3, 5, 20, 32)
    plan = ring_mask_plan("contiguous", 4, 3, 8, causal=True, cu=cu)
    assert norm(plan, 8) == [
        [((0, 8, 1), (0, 8, 1), True, True)],
        [((0, 8, 1), (4, 8, 1), False, True)],
        [],
    ]
    # rank 0 holds three documents: three causal diagonal blocks, no mask, nothing else
    plan0 = ring_mask_plan("contiguous", 4, 0, 8, causal=True, cu=cu)
    assert norm(plan0, 8)[0] == [
        ((0, 3, 1), (0, 3, 1), True, True),
        ((3, 5, 1), (3, 5, 1), True, True),
        ((5, 8, 1), (5, 8, 1), True, True),
    ]


def test_one_document_per_rank_needs_one_step():
    for layout in ("contiguous",):
        plan = ring_mask_plan(layout, 4, 2, 8, causal=False, cu=(0, 8, 16, 24, 32))
        assert len(plan) == 1


@pytest.mark.parametrize("left", [-1, 0, 1, 7, 8, 9, 20, 100])
def test_causal_window_truncates_the_ring(left):
    world, n = 6, 8
    T = {
        len(ring_mask_plan("contiguous", world, r, n, causal=True, window=(left, 0)))
        for r in range(world)
    }
    expect = world if left == -1 else min(world, 1 + math.ceil(left / n))
    assert T == {expect} == {window_steps(left, n, world)}


def test_striped_window_reaches_left_neighbours_only():
    # striped: rank r holds r, r+W, ...: a window of 2 tokens reaches ranks r-1, r-2
    plans = [ring_mask_plan("striped", 6, r, 4, causal=True, window=(2, 0)) for r in range(6)]
    assert {len(p) for p in plans} == {3}


def test_tiles_split_a_banded_block():
    """One block of 32 tokens with a window of 3: tiles of 8 keep only the band's tiles."""
    pos = torch.arange(32)
    works = block_works(pos, pos, causal=True, window=(3, 0), tile=8)
    assert computed(works, 32, 32).equal(oracle(pos, pos, True, None, (3, 0)).int())
    area = sum(len(range(*w.q.indices(32))) * len(range(*w.kv.indices(32))) for w in works)
    assert area < 32 * 32 // 2  # less than the causal triangle: the band, not the block


# ----------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flops_count_exactly_the_allowed_pairs(layout):
    world, s = 4, 32
    cu, window = (0, 3, 5, 17, 30, 32), (5, 0)
    flops = mask_flops(layout, world, s, causal=True, cu_seqlens=cu, window=window, heads=2)
    pos = torch.arange(s)
    pairs = int(oracle(pos, pos, True, cu, window).sum())
    assert sum(flops) == 4 * 2 * pairs
    # no mask: the same numbers as the schedule's own count
    plain = mask_flops(layout, world, s, causal=True)
    assert plain == attention_flops(layout, world, s, True)
    # the window is far cheaper than the full causal triangle
    assert sum(mask_flops(layout, world, s, causal=True, window=(2, 0))) < sum(plain) / 4


def test_plan_flops_computed_vs_allowed():
    plan = ring_mask_plan("striped", 2, 1, 8, causal=True, window=(2, 0))
    useful = plan_flops(plan, 8, 8)
    dense = plan_flops(plan, 8, 8, allowed=False)
    assert 0 < useful <= dense


# ----------------------------------------------------------------------------- positions


@pytest.mark.parametrize("layout", LAYOUTS)
def test_positions_restart_at_each_document(layout):
    s, world = 24, 3
    cu = torch.tensor([0, 3, 5, 13, 24], dtype=torch.int32)
    starts = torch.tensor([0, 0, 0, 3, 3, *[5] * 8, *[13] * 11])
    for r in range(world):
        idx = local_indices(s, layout, r, world)
        got = positions(s, layout, rank=r, world_size=world, cu_seqlens=cu)
        assert torch.equal(got, idx - starts[idx])
        assert torch.equal(positions(s, layout, rank=r, world_size=world), idx)
    assert (positions(s, "contiguous", rank=0, world_size=1, cu_seqlens=cu) == 0).sum() == 4


# ----------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    "cu, words",
    [
        ([0, 5, 3, 8], "strictly increasing"),
        ([0, 3, 3, 8], "strictly increasing"),
        ([0, 3, 6], "must end at the global sequence length 8"),
        ([2, 8], "must start at 0"),
        ([8], "length n_docs + 1 >= 2"),
        ([[0, 8]], "1-D"),
    ],
)
def test_bad_cu_seqlens(cu, words):
    with pytest.raises(ValueError, match="cu_seqlens") as ei:
        check_cu_seqlens(torch.tensor(cu, dtype=torch.int32), 8, name="f")
    assert words in str(ei.value)


def test_cu_seqlens_float_and_ok():
    with pytest.raises(ValueError, match="int32"):
        check_cu_seqlens(torch.tensor([0.0, 8.0]), 8, name="f")
    assert check_cu_seqlens(torch.tensor([0, 3, 8], dtype=torch.int32), 8, name="f") == (0, 3, 8)
    assert check_cu_seqlens(None, 8, name="f") is None


@pytest.mark.parametrize(
    "window, causal, words",
    [
        ((3, 2), True, "right must be 0"),
        ((-2, 0), False, "-1 for unbounded"),
        ((3,), False, "pair of ints"),
        ("ab", False, "pair of ints"),
        ((1.5, 0), False, "pair of ints"),
    ],
)
def test_bad_window(window, causal, words):
    with pytest.raises(ValueError, match="window") as ei:
        check_window(window, causal, name="f")
    assert words in str(ei.value)


def test_window_normalised():
    assert check_window((-1, -1), True, name="f") is None
    assert check_window([4, -1], True, name="f") == (4, -1)
    assert check_window((4, 2), False, name="f") == (4, 2)


def test_config_errors_single_process():
    q = torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match="strategy='tree' is unknown"):
        ringattn.context_parallel_attention(q, q, q, strategy="tree")
    with pytest.raises(ValueError, match="only for strategy='hybrid'"):
        ringattn.context_parallel_attention(q, q, q, mesh=object())
    with pytest.raises(ValueError, match="needs mesh="):
        ringattn.context_parallel_attention(q, q, q, strategy="hybrid")
    with pytest.raises(ValueError, match="2-D DeviceMesh"):
        ringattn.context_parallel_attention(q, q, q, strategy="hybrid", mesh=object())


@pytest.mark.parametrize("strategy", ["ring", "allgather", "ulysses"])
def test_single_process_matches_oracle(strategy):
    """Without torch.distributed, every strategy is local attention with the mask."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 16, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 16, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    cu, window = (0, 3, 5, 11, 16), (4, 0)
    out, lse = ringattn.context_parallel_attention(
        q,
        k,
        v,
        strategy=strategy,
        causal=True,
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        window=window,
        return_lse=True,
        kernel="blockwise",
    )
    pos = torch.arange(16)
    ref_out, ref_lse = naive_attention(q, k, v, mask=oracle(pos, pos, True, cu, window))
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
