"""The "packed" layout (ringattn.balance): a valid permutation with sorted shards of s/W
tokens, round trips, document positions, the balance bound, determinism, clear errors."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ringattn.balance as B
from ringattn import permutation, positions, shard
from ringattn.layouts import local_indices


@st.composite
def packed_case(draw):
    """(cu_seqlens tuple, W): W in 1..8, s = W * n, documents of any length >= 1."""
    world = draw(st.integers(1, 8))
    s = world * draw(st.integers(1, 48))
    kind = draw(st.sampled_from(["tiny", "any", "lognormal"]))
    rng = random.Random(draw(st.integers(0, 2**32)))
    cu = [0]
    while cu[-1] < s:
        if kind == "tiny":
            length = rng.randint(1, 4)
        elif kind == "any":
            length = rng.randint(1, s)
        else:
            length = int(min(s, max(1.0, math.exp(rng.gauss(2.0, 1.5)))))
        cu.append(min(s, cu[-1] + length))
    return tuple(cu), world


def doc_positions(cu) -> torch.Tensor:
    """Document-relative position of every global token, (s,) long (independent of balance)."""
    return torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])


@settings(max_examples=300, deadline=None)
@given(packed_case())
def test_valid_permutation_of_sorted_equal_shards(case):
    cu, world = case
    s = cu[-1]
    perm = permutation(s, "packed", world, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    assert sorted(perm.tolist()) == list(range(s))
    for r in range(world):
        idx = local_indices(s, "packed", r, world, cu_seqlens=list(cu))
        assert idx.numel() == s // world
        assert bool((idx[1:] > idx[:-1]).all()), "mask_plan needs increasing positions"


@settings(max_examples=150, deadline=None)
@given(packed_case(), st.integers(1, 2))
def test_shard_unshard_round_trip_and_positions(case, dim):
    cu, world = case
    s = cu[-1]
    shape = [2, 3]
    shape.insert(dim, s)
    x = torch.randn(shape)
    parts = [
        shard(x, "packed", rank=r, world_size=world, dim=dim, cu_seqlens=cu) for r in range(world)
    ]
    restored = torch.cat(parts, dim).index_select(
        dim, torch.argsort(permutation(s, "packed", world, cu_seqlens=cu))
    )
    assert torch.equal(restored, x)
    ref = doc_positions(cu)
    for r in range(world):
        got = positions(s, "packed", rank=r, world_size=world, cu_seqlens=torch.tensor(cu))
        assert torch.equal(got, ref[local_indices(s, "packed", r, world, cu_seqlens=cu)])


def spread_bound(cu, world) -> float:
    """The designed bound on max - min work: one document placed whole, one bundle quantum,
    and the remainders of the head-tail splits (2 L per split document of length L)."""
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    target = sum(B.tri(n) for n in lens) / world
    split = lambda n: world > 1 and n >= 2 * world and B.tri(n) > B.SPLIT_FRACTION * target
    whole = max((B.tri(n) for n in lens if not split(n)), default=0)
    return whole + B.BUNDLE_FRACTION * target + sum(2 * n for n in lens if split(n))


@settings(max_examples=300, deadline=None)
@given(packed_case())
def test_balance_bound(case):
    cu, world = case
    pos = doc_positions(cu)
    # work from the permutation and the positions, not from the balancer's own sums
    work = [
        int((pos[local_indices(cu[-1], "packed", r, world, cu_seqlens=cu)] + 1).sum())
        for r in range(world)
    ]
    assert work == B.rank_work(cu, world)
    assert max(work) - min(work) <= spread_bound(cu, world)


def lognormal_pack(s: int, seed: int) -> tuple[int, ...]:
    rng, cu = random.Random(seed), [0]
    while cu[-1] < s:
        cu.append(min(s, cu[-1] + int(min(s, max(64.0, math.exp(rng.gauss(7.0, 1.5)))))))
    return tuple(cu)


@pytest.mark.parametrize("world", [4, 8])
def test_realistic_packs_within_five_percent(world):
    """The issue's target on its own distribution: 64 tokens to the whole 32K pack."""
    for seed in range(6):
        work = B.rank_work(lognormal_pack(32768, seed), world)
        assert max(work) / min(work) <= 1.05, (seed, work)


def test_long_document_is_split_head_tail_and_short_ones_stay_whole():
    # W = 2, s = 16: a document of 12 tokens, then 1, 2, 1: the 12 go 3+3 | 3+3 head-tail
    cu = (0, 12, 13, 15, 16)
    runs = B.packed_runs(cu, 2)
    assert runs[0][:2] == ((0, 3), (9, 12)) and runs[1][0] == (3, 9)
    for a, b in zip(cu[1:-1], cu[2:]):  # each short document lies inside one run
        assert sum(1 for rr in runs for x, y in rr if x <= a and b <= y) == 1
    # 1+2+3 + 10+11+12 = 4+...+9 = 39 each, plus the short documents' 3 | 1 + 1
    assert sorted(B.rank_work(cu, 2)) == [41, 42]


def test_deterministic_and_input_type_independent():
    cu = lognormal_pack(65536, 3)
    first = B.packed_runs(cu, 8)
    B.packed_runs.cache_clear()
    assert B.packed_runs(cu, 8) == first
    t = torch.tensor(cu, dtype=torch.int32)
    assert torch.equal(
        permutation(cu[-1], "packed", 8, cu_seqlens=t),
        permutation(cu[-1], "packed", 8, cu_seqlens=list(cu)),
    )


def test_one_rank_is_the_identity():
    cu = (0, 5, 7, 20)
    assert local_indices(20, "packed", 0, 1, cu_seqlens=cu).tolist() == list(range(20))


@pytest.mark.parametrize(
    "cu, seq, world, words",
    [
        (None, 8, 2, "needs cu_seqlens"),
        ((0, 3, 7), 8, 2, "sequence length 8"),
        ((0, 3, 3, 8), 8, 2, "rise strictly"),
        ((0, 3, 9), 9, 2, "not divisible by world_size 2"),
    ],
)
def test_errors_name_the_fix(cu, seq, world, words):
    with pytest.raises(ValueError, match=words):
        shard(torch.zeros(1, seq), "packed", rank=0, world_size=world, cu_seqlens=cu)


@pytest.mark.parametrize(
    "data",
    [
        ["--data.kind=retrieval"],
        ["--data.kind=text", "--data.paths=['x']", "--data.cross_doc_attention=true"],
    ],
    ids=["retrieval", "cross_doc"],
)
def test_trainer_config_packed_needs_documents(data):
    from ringattn.train.config import load_config

    with pytest.raises(ValueError, match="parallel.layout='packed'.*zigzag"):
        load_config(None, ["--parallel.layout=packed", "--parallel.cp=2", *data])


def test_shard_batch_packed_rows_use_their_own_documents():
    from ringattn.parallel.cp import shard_batch

    tokens = torch.arange(32).view(2, 16)
    cus = [torch.tensor([0, 12, 16]), torch.tensor([0, 2, 16])]
    tok, lab, pos = shard_batch(
        tokens, tokens + 100, layout="packed", cp_rank=1, cp=2, cu_seqlens=cus
    )
    for i, cu in enumerate(cus):
        idx = local_indices(16, "packed", 1, 2, cu_seqlens=cu)
        assert torch.equal(tok[i], tokens[i, idx]) and torch.equal(lab[i], tokens[i, idx] + 100)
        assert torch.equal(pos[i], doc_positions(cu.tolist())[idx])
    with pytest.raises(ValueError, match="has none"):
        shard_batch(tokens, tokens, layout="packed", cp_rank=0, cp=2)
