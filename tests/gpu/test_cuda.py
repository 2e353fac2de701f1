"""CUDA kernels behind the same interface; skipped cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch

from ringattn import blockwise_attention, context_parallel_attention, ring_attention
from ringattn.kernels import flash, get_kernel
from tests.oracle import allowed_mask, grads, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _inputs(dtype, b=2, s=256, h=8, hk=2, d=64):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(b, s, n, d, generator=g) for n in (h, hk, hk, h)]
    return [t.to(dtype) for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", ["sdpa", "flash_attn", "blockwise"])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_kernel_single_rank(dtype, kernel, causal):
    if kernel == "flash_attn" and (dtype == torch.float32 or not flash.flash_attn_available()):
        pytest.skip("flash_attn needs the package and half precision")
    q, k, v, do = _inputs(dtype)
    dev = [t.cuda().requires_grad_() for t in (q, k, v)]
    out, lse = ring_attention(*dev, causal=causal, kernel=kernel, return_lse=True)
    out.backward(do.cuda())
    r_out, r_lse, r_g = grads(q, k, v, do, causal=causal)
    n_out, _, n_g = grads(q, k, v, do, causal=causal, dtype=dtype)
    assert rel_err(out.cpu(), r_out) <= max(2 * rel_err(n_out, r_out), 1e-5) + 1e-4
    assert rel_err(lse.cpu(), r_lse) <= 1e-3
    for t, r, n in zip(dev, r_g, n_g):
        assert rel_err(t.grad.cpu(), r) <= max(2 * rel_err(n, r), 1e-5) + 1e-4


def test_blockwise_on_cuda():
    q, k, v, do = _inputs(torch.float32, s=300)
    out = blockwise_attention(q.cuda(), k.cuda(), v.cuda(), causal=True, block_size=64)
    r_out, _, _ = grads(q, k, v, do, causal=True)
    assert rel_err(out.cpu(), r_out) < 1e-5


def test_auto_kernel_on_cuda():
    q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert get_kernel("auto", q.device, q.dtype).name in ("flash_attn|sdpa-cuda", "sdpa-cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["sdpa", "flash_attn"])
@pytest.mark.parametrize("d", [64, 20])
def test_cuda_documents_and_window(dtype, kernel, d):
    # masked pieces (efficient op, padded bias rows, 32-row LSE), plain pieces (flash op or
    # flash_attn, native GQA) and head dims the flash kernels lack, on a real GPU
    if kernel == "flash_attn" and not flash.flash_attn_available():
        pytest.skip("needs flash_attn")
    q, k, v, do = _inputs(dtype, s=384, d=d)
    cu = torch.tensor([0, 100, 260, 384], dtype=torch.int32)
    dev = [t.cuda().requires_grad_() for t in (q, k, v)]
    out = context_parallel_attention(
        *dev, causal=True, cu_seqlens=cu.cuda(), window=(120, 0), layout="contiguous",
        kernel=kernel,
    )  # fmt: skip
    out.backward(do.cuda())
    pos = torch.arange(384)
    doc = torch.bucketize(pos, cu[1:], right=True)
    mask = allowed_mask(pos, pos, causal=True, q_doc=doc, k_doc=doc, window=(120, 0))
    r_out, _, r_g = grads(q, k, v, do, mask=mask)
    n_out, _, n_g = grads(q, k, v, do, mask=mask, dtype=dtype)
    assert rel_err(out.cpu(), r_out) <= max(2 * rel_err(n_out, r_out), 1e-5) + 1e-4
    for t, r, n in zip(dev, r_g, n_g):
        assert rel_err(t.grad.cpu(), r) <= max(2 * rel_err(n, r), 1e-5) + 1e-4
