"""The stand-in flash_attn of ``ringattn bench peers`` in one process: flash-attn 2.6.3's
signatures and return tuples, its block results against the float64 oracle, and nothing left
in ``sys.modules`` after ring-flash-attn is loaded through it."""

from __future__ import annotations

import importlib.util
import inspect
import sys

import pytest
import torch

from ringattn.bench import peer_adapters as pa
from tests.oracle import grads, rel_err

# flash_attn/flash_attn_interface.py of flash-attn 2.6.3
FWD_26 = "q k v dropout_p softmax_scale causal window_size softcap alibi_slopes return_softmax"
BWD_26 = (
    "dout q k v out softmax_lse dq dk dv dropout_p softmax_scale causal window_size softcap "
    "alibi_slopes deterministic rng_state"
)


def test_signatures_are_flash_attn_26():
    assert list(inspect.signature(pa._flash_attn_forward).parameters) == FWD_26.split()
    assert list(inspect.signature(pa._flash_attn_backward).parameters) == BWD_26.split()


@pytest.mark.parametrize("sq,sk,causal", [(8, 8, True), (8, 16, False), (4, 8, False)])
def test_stand_in_block_matches_oracle(sq, sk, causal):
    g = torch.Generator().manual_seed(sq + sk)
    q, do = (torch.randn(2, sq, 4, 16, generator=g) for _ in range(2))  # (b, s, h, d)
    k, v = (torch.randn(2, sk, 4, 16, generator=g) for _ in range(2))
    mask = torch.ones(sq, sk, dtype=torch.bool).tril() if causal else None
    ref_out, ref_lse, ref_g = grads(q, k, v, do, dtype=torch.float64, mask=mask)
    outs = pa._flash_attn_forward(q, k, v, 0.0, 16**-0.5, causal, (-1, -1), 0.0, None, False)
    assert len(outs) == 8  # the 2.6 tuple ring-flash-attn unpacks
    out, lse = outs[0], outs[5]
    assert out.shape == q.shape and lse.shape == (2, 4, sq) and lse.dtype == torch.float32
    bufs = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    back = pa._flash_attn_backward(
        do, q, k, v, out, lse, *bufs, 0.0, 16**-0.5, causal, (-1, -1), 0.0, None, False
    )
    assert all(b is t for b, t in zip(back[:3], bufs))  # written in place, as flash-attn does
    for got, ref in zip((out, lse, *bufs), (ref_out, ref_lse, *ref_g)):
        assert rel_err(got, ref) <= 1e-5


def test_stand_in_rejects_what_it_does_not_map():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(NotImplementedError, match="window"):
        pa._flash_attn_forward(q, q, q, 0.0, 0.25, False, (4, 0), 0.0, None, False)
    with pytest.raises(NotImplementedError, match="square"):
        pa._flash_attn_forward(q, q[:, :4], q[:, :4], 0.0, 0.25, True, (-1, -1), 0.0, None, False)


@pytest.mark.skipif(importlib.util.find_spec("ring_flash_attn") is None, reason="not installed")
def test_ring_flash_attn_loads_and_leaves_no_modules():
    before = {n for n in sys.modules if n.split(".")[0] in ("flash_attn", "ring_flash_attn")}
    fn = pa.ring_flash_attn_zigzag()
    after = {n for n in sys.modules if n.split(".")[0] in ("flash_attn", "ring_flash_attn")}
    assert callable(fn) and fn.__name__ == "zigzag_ring_flash_attn_func"
    assert after == before
    # the function kept the stand-in it imported
    assert fn.__globals__["_flash_attn_forward"] is pa._flash_attn_forward
