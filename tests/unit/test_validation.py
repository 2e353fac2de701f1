"""Bad input gets a ValueError naming the argument and the fix (single process)."""

from __future__ import annotations

import pytest
import torch

from ringattn import blockwise_attention, ring_attention


def qkv(b=1, s=8, h=4, hk=2, d=8, dtype=torch.float32):
    return (
        torch.randn(b, s, h, d, dtype=dtype),
        torch.randn(b, s, hk, d, dtype=dtype),
        (torch.randn(b, s, hk, d, dtype=dtype)),
    )


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda q, k, v: (q[0], k, v), "q must be 4-D"),
        (lambda q, k, v: (q, k.double(), v), "share a dtype"),
        (lambda q, k, v: (q.int(), k, v), "q has dtype"),
        (lambda q, k, v: (q, k, v[:, :, :1]), "k .* and v .* must match"),
        (lambda q, k, v: (q, k[:, :4], v[:, :4]), "local sequence length"),
        (lambda q, k, v: (q[..., :4], k, v), "head_dim"),
        (lambda q, k, v: (q[:, :, :3], k, v), "multiple of k/v heads"),
        (lambda q, k, v: (q, k.to("meta"), v), "one device"),
        (lambda q, k, v: ("q", k, v), "torch.Tensor"),
    ],
)
def test_ring_rejects(mutate, match):
    with pytest.raises(ValueError, match=match):
        ring_attention(*mutate(*qkv()))


def test_unknown_layout_and_kernel():
    with pytest.raises(ValueError, match="layout='snake' is unknown"):
        ring_attention(*qkv(), layout="snake")
    with pytest.raises(ValueError, match="kernel='triton' is unknown"):
        ring_attention(*qkv(), kernel="triton")


def test_zigzag_odd_local_length():
    with pytest.raises(ValueError, match="even local length"):
        ring_attention(*qkv(s=7), layout="zigzag")


def test_blockwise_block_size():
    with pytest.raises(ValueError, match="block_size"):
        blockwise_attention(*qkv(), block_size=0)


def test_single_process_ring_equals_blockwise():
    # without torch.distributed the ring is one rank: same numbers as the local kernel
    q, k, v = qkv(dtype=torch.float64)
    a = ring_attention(q, k, v, causal=True, kernel="blockwise")
    b = blockwise_attention(q, k, v, causal=True)
    assert torch.allclose(a, b, rtol=0, atol=1e-14)
