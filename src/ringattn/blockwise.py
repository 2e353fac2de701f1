"""Single-device blockwise attention (the BPT half of the paper), forward and backward.

The same autograd function as the ring with a one-rank "ring": forward keeps only
(q, k, v, out, lse); backward recomputes scores one (block x block) tile at a time, so memory
is bounded by the block size in both directions.
"""

from __future__ import annotations

from .comm import Ring
from .kernels import blockwise_kernel
from .ring import ring_pass
from .schedule import BlockWork
from .validate import check_qkv


def blockwise_attention(
    q, k, v, *, causal=False, softmax_scale=None, block_size=256, return_lse=False
):
    """Exact attention on one device with memory bounded by ``block_size``.

    q (b, s_q, h, d); k, v (b, s_k, h_kv, d) with ``h % h_kv == 0``. ``causal`` is top-left
    aligned (query i sees keys 0..i). Returns out (b, s_q, h, d) in the input dtype, or
    (out, lse) with lse (b, h, s_q) fp32.
    """
    check_qkv(q, k, v, name="blockwise_attention", same_len=False)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(
            f"blockwise_attention: block_size must be a positive int, got {block_size}"
        )
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    plan = ((BlockWork(slice(0, None), slice(0, None), causal),),)
    kernel = blockwise_kernel(block_size)
    out, lse = ring_pass(q, k, v, scale=scale, plan=plan, ring=Ring.local(), kernel=kernel)
    return (out, lse) if return_lse else out
