"""Local kernels and the single-device blockwise attention against the float64 oracle."""

from __future__ import annotations

import pytest
import torch

from ringattn import MaskSpec, blockwise_attention
from ringattn.kernels import blockwise_kernel, get_kernel, merge_
from tests.oracle import allowed_mask, grads, naive_attention, rel_err


def _inputs(b=2, sq=37, sk=37, h=4, hk=2, d=16, dtype=torch.float32, seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g) * q_scale
    k = torch.randn(b, sk, hk, d, generator=g)
    v = torch.randn(b, sk, hk, d, generator=g)
    do = torch.randn(b, sq, h, d, generator=g)
    return [t.to(dtype) for t in (q, k, v, do)]


def _run_blockwise(q, k, v, do, **kw):
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = blockwise_attention(qq, kk, vv, return_lse=True, **kw)
    out.backward(do)
    return out, lse, (qq.grad, kk.grad, vv.grad)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("block", [5, 16, 256])
def test_blockwise_matches_oracle_fp64(causal, heads, block):
    q, k, v, do = _inputs(h=heads[0], hk=heads[1], dtype=torch.float64)
    out, lse, g = _run_blockwise(q, k, v, do, causal=causal, block_size=block)
    r_out, r_lse, r_g = grads(q, k, v, do, causal=causal)
    assert rel_err(out, r_out) < 1e-12 and rel_err(lse, r_lse) < 1e-12
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(g, r_g))


@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_cross_lengths(causal):
    # sq != sk: causal is top-left aligned (query i sees keys 0..i)
    q, k, v, do = _inputs(sq=20, sk=33, dtype=torch.float64)
    out, lse, g = _run_blockwise(q, k, v, do, causal=causal, block_size=7)
    mask = torch.ones(20, 33, dtype=torch.bool).tril() if causal else None
    r_out, r_lse, r_g = grads(q, k, v, do, mask=mask)
    assert rel_err(out, r_out) < 1e-12 and all(rel_err(a, b) < 1e-12 for a, b in zip(g, r_g))


@pytest.mark.parametrize("kernel", ["blockwise", "sdpa"])
@pytest.mark.parametrize("d", [16, 80, 17])
def test_kernels_fp32(kernel, d):
    q, k, v, do = _inputs(d=d)
    kern = get_kernel(kernel, q.device, q.dtype)
    qt, kt, vt, dot = (t.transpose(1, 2) for t in (q, k, v, do))
    out, lse = kern.forward(qt, kt, vt, causal=True, scale=d**-0.5)
    dq, dk, dv = kern.backward(dot, qt, kt, vt, out, lse, causal=True, scale=d**-0.5)
    r_out, r_lse, r_g = grads(q, k, v, do, causal=True)
    assert rel_err(out.transpose(1, 2), r_out) < 1e-5 and rel_err(lse, r_lse) < 1e-5
    for a, b in zip((dq, dk, dv), r_g):
        assert rel_err(a.transpose(1, 2), b) < 1e-5
    assert dk.shape[1] == k.shape[2]  # GQA gradients come back with h_kv heads


@pytest.mark.parametrize("kernel", ["blockwise", "sdpa"])
def test_general_mask_with_empty_rows(kernel):
    # documents + window; the first query row of the second doc sees nothing of this KV slice
    q, k, v, do = _inputs(sq=12, sk=12)
    qp = torch.arange(12)
    doc = torch.tensor([0] * 5 + [1] * 7)
    spec = MaskSpec(qp, qp - 6, causal=True, q_doc=doc, k_doc=doc, window=(3, -1))
    allowed = allowed_mask(qp, qp - 6, causal=True, q_doc=doc, k_doc=doc, window=(3, -1))
    assert not allowed.all(-1).all() and not allowed.any(-1).all()  # has empty rows
    kern = get_kernel(kernel, q.device, q.dtype)
    qt, kt, vt, dot = (t.transpose(1, 2) for t in (q, k, v, do))
    out, lse = kern.forward(qt, kt, vt, causal=False, scale=0.25, mask=spec)
    dq, dk, dv = kern.backward(dot, qt, kt, vt, out, lse, causal=False, scale=0.25, mask=spec)
    r_out, r_lse, r_g = grads(q, k, v, do, mask=allowed, scale=0.25)
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse))  # empty rows: lse = -inf, not 0
    assert rel_err(out.transpose(1, 2), r_out) < 1e-5 and rel_err(lse, r_lse) < 1e-5
    for a, b in zip((dq, dk, dv), r_g):
        assert rel_err(a.transpose(1, 2), b) < 1e-5


def test_merge_is_exact_and_handles_empty_rows():
    q, k, v, _ = _inputs(sq=9, sk=20, dtype=torch.float64)
    full, full_lse = naive_attention(q, k, v)
    a, la = naive_attention(q, k[:, :8], v[:, :8])
    b, lb = naive_attention(q, k[:, 8:], v[:, 8:])
    out = torch.zeros_like(full).transpose(1, 2).contiguous()  # (b, h, s, d)
    lse = torch.full_like(full_lse, float("-inf"))
    empty_out, empty_lse = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
    merge_(out, lse, empty_out, empty_lse)  # two empty partials stay empty, no NaN
    assert torch.isinf(lse).all() and not out.isnan().any()
    merge_(out, lse, a.transpose(1, 2), la)
    merge_(out, lse, b.transpose(1, 2), lb)
    assert rel_err(out.transpose(1, 2), full) < 1e-13 and rel_err(lse, full_lse) < 1e-13


def test_peaked_logits_do_not_overflow():
    q, k, v, do = _inputs(q_scale=30.0)
    out, lse, g = _run_blockwise(q, k, v, do, causal=True, block_size=8)
    r_out, r_lse, r_g = grads(q, k, v, do, causal=True)
    assert torch.isfinite(out).all() and rel_err(out, r_out) < 1e-5
    assert all(rel_err(a, b) < 1e-4 for a, b in zip(g, r_g))


def test_blockwise_backward_saves_only_inputs_and_output():
    # memory bounded by the block: autograd keeps q, k, v, out, lse, never an s x s tensor
    q, k, v, _ = _inputs(sq=96, sk=96)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    qq = q.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        blockwise_attention(qq, k, v, causal=True, block_size=16)
    b, s, h, _ = q.shape
    assert max(sizes) <= q.numel()
    assert s * s not in sizes and b * h * s * s not in sizes


def test_bf16_within_twice_naive():
    q, k, v, do = _inputs(dtype=torch.bfloat16, sq=64, sk=64)
    out, lse, g = _run_blockwise(q, k, v, do, causal=True, block_size=16)
    r_out, _, r_g = grads(q, k, v, do, causal=True)
    n_out, _, n_g = grads(q, k, v, do, causal=True, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert rel_err(out, r_out) <= 2 * rel_err(n_out, r_out)
    for a, b, n in zip(g, r_g, n_g):
        assert rel_err(a, b) <= 2 * rel_err(n, b)


def test_kernel_object_and_errors():
    q = torch.randn(1, 4, 2, 8)
    assert get_kernel(blockwise_kernel(4), q.device, q.dtype).name == "blockwise[4]"
    with pytest.raises(ValueError, match="kernel='nope' is unknown"):
        get_kernel("nope", q.device, q.dtype)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_precision_computes_in_fp32_without_bf16_units(monkeypatch, native, dtype):
    # CPUs without bf16 matrix units emulate bf16 ~250x slower than fp32: there the CPU op
    # runs the block in fp32 (fp32 out, merged in fp32, cast once by the caller). The probe
    # is decided once; both answers are exercised here whatever this machine is.
    from ringattn.kernels import fused

    seen = []
    real = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    class Spy:
        def __call__(self, q, *a, **kw):
            seen.append(q.dtype)
            return real(q, *a, **kw)

    monkeypatch.setattr(fused, "cpu_half_is_native", lambda: native)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", Spy())
    q, k, v, do = _inputs(dtype=dtype)
    out, lse = fused.cpu_forward(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, scale=0.25)
    want = dtype if native else torch.float32
    assert seen == [want] and out.dtype == want and lse.dtype == torch.float32
    r_out = naive_attention(q, k, v, causal=True, scale=0.25)[0]
    naive = naive_attention(q, k, v, causal=True, scale=0.25, dtype=dtype)[0]
    assert rel_err(out.transpose(1, 2), r_out) <= 2 * max(rel_err(naive, r_out), 1e-3)
