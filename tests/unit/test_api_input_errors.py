"""Bad sizes given to the layout helpers and the FLOP counter: a ValueError naming the
argument, never a ZeroDivisionError or an error from inside torch."""

from __future__ import annotations

import pytest
import torch

from ringattn import attention_flops, positions, shard

CU_BAD = [
    (torch.tensor([0, 5, 3, 8]), "must not decrease"),
    (torch.tensor([0, 5, 6]), "end at seq_len=8"),
    (torch.tensor([1, 5, 8]), "start at 0"),
    (torch.tensor([[0, 8]]), "1-D"),
    (torch.tensor([0]), "1-D"),
]


@pytest.mark.parametrize("cu, message", CU_BAD, ids=[m for _, m in CU_BAD])
def test_positions_rejects_bad_cu_seqlens(cu, message):
    with pytest.raises(ValueError, match="cu_seqlens") as err:
        positions(8, "zigzag", rank=0, world_size=2, cu_seqlens=cu)
    assert message in str(err.value)


def test_positions_accepts_empty_documents():
    pos = positions(8, "contiguous", rank=0, world_size=1, cu_seqlens=torch.tensor([0, 3, 3, 8]))
    assert pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 4]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_negative_length_and_zero_world(layout):
    with pytest.raises(ValueError, match="seq_len=-8 must be an int >= 0"):
        positions(-8, layout, rank=0, world_size=2)
    with pytest.raises(ValueError, match="world_size=0 must be an int >= 1"):
        shard(torch.zeros(1, 8), layout, rank=0, world_size=0)
    with pytest.raises(ValueError, match="world_size=-2"):
        positions(8, layout, rank=0, world_size=-2)
    with pytest.raises(ValueError, match="seq_len=-8 must be an int >= 0"):
        attention_flops(layout, 2, -8, True)
    with pytest.raises(ValueError, match="world_size=0"):
        attention_flops(layout, 0, 8, True)
