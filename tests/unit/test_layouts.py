"""Layouts are permutations: shard/unshard round trips, positions, divisibility errors."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ringattn import permutation, positions, shard
from ringattn.layouts import LAYOUTS, local_indices


@st.composite
def layout_case(draw):
    layout = draw(st.sampled_from(LAYOUTS))
    world = draw(st.integers(1, 9))
    parts = 2 * world if layout == "zigzag" else world
    seq = parts * draw(st.integers(1, 6))
    return layout, world, seq


@settings(max_examples=150, deadline=None)
@given(layout_case())
def test_permutation_is_a_permutation(case):
    layout, world, seq = case
    perm = permutation(seq, layout, world)
    assert sorted(perm.tolist()) == list(range(seq))


@settings(max_examples=150, deadline=None)
@given(layout_case(), st.integers(1, 3))
def test_shard_then_unshard_round_trips(case, dim):
    layout, world, seq = case
    shape = [2, 3, 4]
    shape.insert(dim, seq)
    x = torch.randn(shape)
    parts = [shard(x, layout, rank=r, world_size=world, dim=dim) for r in range(world)]
    assert all(p.shape[dim] == seq // world for p in parts)
    full = torch.cat(parts, dim=dim)
    restored = full.index_select(dim, torch.argsort(permutation(seq, layout, world)))
    assert torch.equal(restored, x)


@settings(max_examples=100, deadline=None)
@given(layout_case())
def test_positions_are_the_sharded_arange(case):
    layout, world, seq = case
    ar = torch.arange(seq).view(1, seq)
    for r in range(world):
        assert torch.equal(
            positions(seq, layout, rank=r, world_size=world),
            shard(ar, layout, rank=r, world_size=world)[0],
        )


def test_zigzag_convention():
    # rank r holds chunks r and 2W-1-r of 2W (ring-flash-attn / Megatron / PyTorch head-tail)
    assert local_indices(16, "zigzag", 0, 4).tolist() == [0, 1, 14, 15]
    assert local_indices(16, "zigzag", 3, 4).tolist() == [6, 7, 8, 9]
    assert local_indices(8, "striped", 1, 4).tolist() == [1, 5]
    assert local_indices(8, "contiguous", 1, 4).tolist() == [2, 3]


def test_positions_restart_per_document():
    cu = torch.tensor([0, 3, 8, 16], dtype=torch.int32)
    pos = positions(16, "contiguous", rank=0, world_size=1, cu_seqlens=cu)
    assert pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7]
    z = positions(16, "zigzag", rank=1, world_size=2, cu_seqlens=cu)  # tokens 4-7 and 8-11
    assert z.tolist() == [1, 2, 3, 4, 0, 1, 2, 3]


@pytest.mark.parametrize(
    "layout,seq,world,needle",
    [
        ("zigzag", 12, 4, "2 * world_size"),
        ("striped", 10, 4, "world_size"),
        ("contiguous", 7, 2, "world_size"),
    ],
)
def test_indivisible_sequence_names_the_fix(layout, seq, world, needle):
    with pytest.raises(ValueError, match=re.escape(needle)) as ei:
        shard(torch.zeros(1, seq), layout, rank=0, world_size=world)
    assert "pad" in str(ei.value)


def test_unknown_layout():
    with pytest.raises(ValueError, match="layout='diagonal' is unknown"):
        permutation(8, "diagonal", 2)
    with pytest.raises(ValueError, match="rank=2"):
        local_indices(8, "contiguous", 2, 2)
