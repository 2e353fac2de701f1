"""The CUDA kernel adapters, proven without a GPU.

- flash_attn: stand-in packages of the 2.6 and 2.7+ conventions (tests/flash_stub.py) check
  every argument as the real ones do and compute with a reference, so numbers are compared.
- aten CUDA ops: the ring runs on the ``meta`` device (shapes, strides and dtypes are real,
  values are not) under ``CudaOpRules``, which checks each op's input rules independently of
  the adapters' own checks. A host sync (``.item()``, ``bool(t)``) raises on meta, so these
  runs also prove the CUDA hot path never branches on a tensor value.

FakeTensorMode with ``device="cuda"`` works in the CPU build for the ops themselves, but
autograd (AccumulateGrad) and Python indexing of such tensors need a CUDA device guard
("PyTorch is not linked with support for cuda devices"), so the ring runs on meta instead.
"""

from __future__ import annotations

import pytest
import torch

from ringattn import context_parallel_attention, ring_attention
from ringattn.kernels import get_kernel
from tests import flash_stub
from tests.cuda_op_rules import CudaOpRules
from tests.oracle import grads, rel_err

CUDA = torch.device("cuda")
VERSIONS = ["2.6.3", "2.7.4", "2.8.3"]


def _bshd(b=2, s=32, h=4, hk=2, d=16, dtype=torch.bfloat16, device="cpu", seed=0):
    """q, k, v, dout in (b, s, h, d) layout."""
    if device == "meta":
        shapes = [(b, s, n, d) for n in (h, hk, hk, h)]
        return [torch.empty(sh, dtype=dtype, device="meta") for sh in shapes]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, n, d, generator=g).to(dtype) for n in (h, hk, hk, h)]


def _t(*xs):
    return [x.transpose(1, 2) for x in xs]  # (b, s, h, d) <-> (b, h, s, d) views


# ----------------------------------------------------------------------------- flash_attn


@pytest.mark.parametrize("version", VERSIONS)
def test_flash_attn_backward_call_convention(monkeypatch, version):
    # flash-attn 2.7+'s _flash_attn_backward is a custom op whose Python signature reads
    # (*args, **kwargs): the convention must come from the version, not from inspect.
    flash_stub.install(monkeypatch, version)
    kern = get_kernel("flash_attn", CUDA, torch.bfloat16)
    q, k, v, do = _bshd()
    r_out, r_lse, r_g = grads(q, k, v, do, causal=True)
    out, lse = r_out.to(q.dtype), r_lse.float()  # the final (out, lse) the ring passes
    dq, dk, dv = kern.backward(*_t(do, q, k, v, out), lse, causal=True, scale=16**-0.5)
    _, _, n_g = grads(q, k, v, do, causal=True, dtype=torch.bfloat16)
    for a, r, n in zip((dq, dk, dv), r_g, n_g):
        assert a.dtype == torch.bfloat16 and a.shape == _t(r)[0].shape
        assert rel_err(a.transpose(1, 2), r) <= 2 * rel_err(n, r)
    assert flash_stub.CALLS["bwd"] == 1


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_forward_returns_lse(monkeypatch, version, causal):
    flash_stub.install(monkeypatch, version)
    kern = get_kernel("flash_attn", CUDA, torch.bfloat16)
    q, k, v, do = _bshd()
    out, lse = kern.forward(*_t(q, k, v), causal=causal, scale=16**-0.5)
    r_out, r_lse, _ = grads(q, k, v, do, causal=causal)
    n_out, _, _ = grads(q, k, v, do, causal=causal, dtype=torch.bfloat16)
    assert lse.dtype == torch.float32 and rel_err(lse, r_lse) < 1e-5
    assert rel_err(out.transpose(1, 2), r_out) <= 2 * rel_err(n_out, r_out)
    assert flash_stub.CALLS["fwd"] == 1  # the low-level op, not flash_attn_func


@pytest.mark.parametrize("version", VERSIONS)
def test_ring_through_flash_attn_matches_oracle(monkeypatch, version):
    flash_stub.install(monkeypatch, version)
    q, k, v, do = _bshd(s=48)
    kern = get_kernel("auto", CUDA, torch.bfloat16)
    assert kern.name.startswith("flash_attn")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*leaves, causal=True, layout="zigzag", kernel=kern)
    out.backward(do)
    r_out, _, r_g = grads(q, k, v, do, causal=True)
    n_out, _, n_g = grads(q, k, v, do, causal=True, dtype=torch.bfloat16)
    assert rel_err(out, r_out) <= 2 * rel_err(n_out, r_out)
    for t, r, n in zip(leaves, r_g, n_g):
        assert rel_err(t.grad, r) <= 2 * rel_err(n, r)


def test_flash_attn_older_than_2_6_is_not_used(monkeypatch):
    flash_stub.install(monkeypatch, "2.5.9")
    assert not get_kernel("auto", CUDA, torch.bfloat16).name.startswith("flash_attn")
    with pytest.raises(ValueError, match="2.6"):
        get_kernel("flash_attn", CUDA, torch.bfloat16)


# ----------------------------------------------------------------------------- masks (1.3)


@pytest.mark.parametrize("kernel", ["auto", "flash_attn"])
def test_flash_attn_never_sees_masked_pieces(monkeypatch, kernel):
    # packed documents + a window (doc 1 is longer than the window: masked; docs 0 and 2 are
    # plain causal): masked pieces go to the efficient op, the others to
    # flash_attn; before, flash_attn raised inside the ring (on some ranks only: a hang)
    flash_stub.install(monkeypatch, "2.8.3")
    kern = get_kernel(kernel, CUDA, torch.bfloat16)
    q, k, v, do = [t.requires_grad_() for t in _bshd(s=128, d=64, device="meta")]
    cu = torch.tensor([0, 40, 100, 128], dtype=torch.int32)
    with CudaOpRules() as rules:
        out = context_parallel_attention(
            q, k, v, causal=True, cu_seqlens=cu, window=(48, 0), kernel=kern
        )
        out.backward(do)
    assert flash_stub.CALLS["fwd"] > 0 and flash_stub.CALLS["bwd"] > 0
    assert rules.calls["_scaled_dot_product_efficient_attention"] > 0
    assert rules.calls["_scaled_dot_product_efficient_attention_backward"] > 0


def test_masked_pieces_fall_back_with_exact_numbers(monkeypatch):
    # the same routing with CPU numbers: flash_attn (stand-in) for plain pieces, the CPU SDPA
    # adapter for masked ones; documents + window against the float64 oracle
    from ringattn.kernels import Kernel, flash_kernel, fused, routed_kernel
    from tests.oracle import allowed_mask

    flash_stub.install(monkeypatch, "2.8.3")
    cpu = Kernel("sdpa-cpu", fused.cpu_forward, fused.cpu_backward)
    kern = routed_kernel(flash_kernel(), cpu)
    q, k, v, do = _bshd(s=64)
    cu = torch.tensor([0, 20, 64], dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = context_parallel_attention(
        *leaves, causal=True, cu_seqlens=cu, window=(24, 0), layout="contiguous", kernel=kern
    )
    out.backward(do)
    pos = torch.arange(64)
    doc = torch.bucketize(pos, cu[1:], right=True)
    mask = allowed_mask(pos, pos, causal=True, q_doc=doc, k_doc=doc, window=(24, 0))
    r_out, _, r_g = grads(q, k, v, do, mask=mask)
    n_out, _, n_g = grads(q, k, v, do, mask=mask, dtype=torch.bfloat16)
    assert flash_stub.CALLS["fwd"] > 0
    assert rel_err(out, r_out) <= 2 * rel_err(n_out, r_out)
    for t, r, n in zip(leaves, r_g, n_g):
        assert rel_err(t.grad, r) <= 2 * rel_err(n, r)


# ----------------------------------------------------------------------------- aten ops


def _meta_blocks(sq, sk, h=4, hk=2, d=64, dtype=torch.bfloat16):
    q = torch.empty(2, sq, h, d, dtype=dtype, device="meta")
    k, v = (torch.empty(2, sk, hk, d, dtype=dtype, device="meta") for _ in range(2))
    do = torch.empty_like(q)
    return _t(q, k, v, do)


def _mask(sq, sk):
    from ringattn.kernels.mask import MaskSpec

    qp = torch.arange(sq, device="meta")
    doc = torch.zeros(sq, dtype=torch.long, device="meta")
    kdoc = torch.zeros(sk, dtype=torch.long, device="meta")
    return MaskSpec(qp, torch.arange(sk, device="meta"), False, doc, kdoc, (5, -1))


def _run_block(kern, q, k, v, do, mask=None, causal=False):
    out, lse = kern.forward(q, k, v, causal=causal, scale=0.125, mask=mask)
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    grads_ = kern.backward(do, q, k, v, out, lse, causal=causal, scale=0.125, mask=mask)
    for g, t in zip(grads_, (q, k, v)):
        assert g.shape == t.shape
    return out, lse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_efficient_bias_rows_are_16_aligned(monkeypatch, dtype):
    # the efficient op reads the additive bias in rows of 16 elements: allocate padded, slice
    flash_stub.fake_cuda(monkeypatch, (9, 0))
    kern = get_kernel("sdpa", CUDA, dtype)
    with CudaOpRules() as rules:
        _run_block(kern, *_meta_blocks(37, 37, dtype=dtype), mask=_mask(37, 37))
    assert rules.calls["_scaled_dot_product_efficient_attention"] == 1


@pytest.mark.parametrize("sq", [37, 64, 100])
def test_efficient_backward_gets_lse_padded_to_32_rows(monkeypatch, sq):
    flash_stub.fake_cuda(monkeypatch, (9, 0))
    kern = get_kernel("sdpa", CUDA, torch.float32)
    with CudaOpRules() as rules:
        _run_block(kern, *_meta_blocks(sq, 48, dtype=torch.float32), mask=_mask(sq, 48))
    assert rules.calls["_scaled_dot_product_efficient_attention_backward"] == 1


@pytest.mark.parametrize(
    "d, capability, op",
    [
        (64, (9, 0), "flash"),
        (256, (8, 0), "flash"),
        (20, (9, 0), "efficient"),  # head_dim % 8 != 0
        (264, (9, 0), "efficient"),  # head_dim > 256
        (64, (7, 5), "efficient"),  # Turing: no flash op
    ],
)
def test_flash_op_constraints_and_native_gqa(monkeypatch, d, capability, op):
    flash_stub.fake_cuda(monkeypatch, capability)
    kern = get_kernel("sdpa", CUDA, torch.bfloat16)
    with CudaOpRules(capability) as rules:
        _run_block(kern, *_meta_blocks(32, 32, h=8, hk=2, d=d), causal=True)
    # the flash op takes GQA natively (2 kv heads); the efficient op needs them repeated (8)
    assert rules.kv_heads[op] == [2 if op == "flash" else 8] * 2
    assert not rules.kv_heads["efficient" if op == "flash" else "flash"]


def test_adapters_check_op_constraints():
    from ringattn.kernels import sdpa_cuda

    q, k, v, _ = _meta_blocks(37, 37, dtype=torch.float32)
    bias = torch.empty(37, 37, device="meta").expand(2, 4, 37, 37)  # row stride 37
    with pytest.raises(sdpa_cuda.KernelConstraintError, match="multiples of 16"):
        sdpa_cuda.check_efficient(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), bias)
    with pytest.raises(sdpa_cuda.KernelConstraintError, match="heads"):
        sdpa_cuda.check_efficient(q, k, v, None)
    lse = torch.empty(2, 4, 37, device="meta")
    with pytest.raises(sdpa_cuda.KernelConstraintError, match="32"):
        sdpa_cuda.check_efficient_lse(q, lse)
    with pytest.raises(sdpa_cuda.KernelConstraintError, match="multiple of 8"):
        sdpa_cuda.check_flash(*(torch.empty(1, 2, 8, 20, device="meta").half() for _ in range(3)))


# ----------------------------------------------------------------------------- part 3


def _cp(q, k, v, kern, fn):
    if fn == "ring":
        return ring_attention(q, k, v, causal=True, layout="zigzag", kernel=kern)
    cu = torch.tensor([0, 40, 100, 128], dtype=torch.int32)
    return context_parallel_attention(
        q, k, v, causal=True, cu_seqlens=cu, window=(48, 0), kernel=kern
    )


@pytest.mark.parametrize("fn", ["ring", "cp_documents_window"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kernel", ["sdpa", "flash_attn"])
@pytest.mark.parametrize("d", [64, 20])
def test_ring_forward_backward_through_cuda_adapters_on_meta(monkeypatch, fn, dtype, kernel, d):
    if kernel == "flash_attn" and dtype == torch.float32:
        pytest.skip("flash_attn is half precision only")
    flash_stub.install(monkeypatch, "2.8.3")
    kern = get_kernel(kernel, CUDA, dtype)
    q, k, v, do = [t.requires_grad_() for t in _bshd(s=128, d=d, dtype=dtype, device="meta")]
    with CudaOpRules() as rules:
        out = _cp(q, k, v, kern, fn)
        out.backward(do)
    assert out.shape == q.shape and out.dtype == dtype
    for t in (q, k, v):
        assert t.grad.shape == t.shape and t.grad.dtype == dtype
    assert sum(rules.calls.values()) + flash_stub.CALLS["fwd"] > 0


@pytest.mark.parametrize("capability", [(9, 0), (7, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [16, 20])
def test_cuda_adapters_numbers_with_reference_ops(monkeypatch, capability, dtype, d):
    # The four CUDA ops replaced by CPU references that check the same rules: documents +
    # window + GQA through the adapters (head-dim padding, bias slicing, LSE padding, rows
    # with no key, dK/dV folding) against the float64 oracle.
    from tests.cuda_op_rules import install_reference_ops
    from tests.oracle import allowed_mask

    flash_stub.fake_cuda(monkeypatch, capability)
    rules = CudaOpRules(capability)
    install_reference_ops(monkeypatch, rules)
    kern = get_kernel("sdpa", CUDA, dtype)
    q, k, v, do = _bshd(s=64, d=d, dtype=dtype)
    cu = torch.tensor([0, 20, 64], dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = context_parallel_attention(
        *leaves, causal=True, cu_seqlens=cu, window=(24, 0), layout="contiguous", kernel=kern
    )
    out.backward(do)
    pos = torch.arange(64)
    doc = torch.bucketize(pos, cu[1:], right=True)
    mask = allowed_mask(pos, pos, causal=True, q_doc=doc, k_doc=doc, window=(24, 0))
    r_out, _, r_g = grads(q, k, v, do, mask=mask)
    n_out, _, n_g = grads(q, k, v, do, mask=mask, dtype=dtype)
    tol = lambda n, r: max(2 * rel_err(n, r), 1e-5)  # noqa: E731
    assert rel_err(out, r_out) <= tol(n_out, r_out)
    for t, r, n in zip(leaves, r_g, n_g):
        assert rel_err(t.grad, r) <= tol(n, r)
    flash_used = rules.calls["_scaled_dot_product_flash_attention"] > 0
    assert flash_used == (capability >= (8, 0) and dtype == torch.bfloat16 and d % 8 == 0)
    assert rules.calls["_scaled_dot_product_efficient_attention_backward"] > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_adapters_rows_without_keys(monkeypatch, dtype):
    # a KV slice that some query rows cannot see at all (the references write NaN there):
    # out 0 and lse -inf, and no NaN reaches the gradients
    from ringattn import MaskSpec
    from tests.cuda_op_rules import install_reference_ops
    from tests.oracle import allowed_mask

    flash_stub.fake_cuda(monkeypatch, (9, 0))
    install_reference_ops(monkeypatch, CudaOpRules())
    kern = get_kernel("sdpa", CUDA, dtype)
    q, k, v, do = _bshd(s=12, d=16, dtype=dtype)
    qp, doc = torch.arange(12), torch.tensor([0] * 5 + [1] * 7)
    spec = MaskSpec(qp, qp - 6, causal=True, q_doc=doc, k_doc=doc, window=(3, -1))
    allowed = allowed_mask(qp, qp - 6, causal=True, q_doc=doc, k_doc=doc, window=(3, -1))
    assert not allowed.any(-1).all()  # has rows without keys
    qt, kt, vt, dot = _t(q, k, v, do)
    out, lse = kern.forward(qt, kt, vt, causal=False, scale=0.25, mask=spec)
    dq, dk, dv = kern.backward(dot, qt, kt, vt, out, lse, causal=False, scale=0.25, mask=spec)
    r_out, r_lse, r_g = grads(q, k, v, do, mask=allowed, scale=0.25)
    n_out, _, n_g = grads(q, k, v, do, mask=allowed, scale=0.25, dtype=dtype)
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse))
    assert rel_err(out.transpose(1, 2), r_out) <= max(2 * rel_err(n_out, r_out), 1e-5)
    for a, r, n in zip((dq, dk, dv), r_g, n_g):
        assert rel_err(a.transpose(1, 2), r) <= max(2 * rel_err(n, r), 1e-5)


def test_meta_runs_catch_host_syncs():
    # why the meta runs above prove "no host sync": the CPU adapter branches on a tensor
    # value (bool(empty.any())), and the same run through it on meta raises
    from ringattn.kernels import Kernel, fused

    cpu = Kernel("sdpa-cpu", fused.cpu_forward, fused.cpu_backward)
    q, k, v, _ = _bshd(s=128, d=64, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        _cp(q, k, v, cpu, "cp_documents_window")


@pytest.mark.parametrize("kernel", ["sdpa", "flash_attn"])
def test_grad_precision_on_cuda(monkeypatch, kernel):
    """CUDA's default ("auto") is "fast": half block backward in flash_attn / the flash op.
    "exact" sends every half block backward to the efficient op in fp32 (the flash kernels
    take only half precision); the forward is unchanged."""
    flash_stub.install(monkeypatch, "2.8.3")
    seen = {}
    for precision in ("auto", "exact"):
        flash_stub.CALLS.clear()
        kern = get_kernel(kernel, CUDA, torch.bfloat16, precision)
        q, k, v, do = [t.requires_grad_() for t in _bshd(s=128, d=64, device="meta")]
        with CudaOpRules() as rules:
            ring_attention(q, k, v, causal=True, kernel=kern).backward(do)
        seen[precision] = (dict(rules.calls), dict(flash_stub.CALLS))
        assert q.grad.dtype == torch.bfloat16 and k.grad.shape == k.shape
    (fast_ops, fast_stub), (exact_ops, exact_stub) = seen["auto"], seen["exact"]
    flash_bwd = "_scaled_dot_product_flash_attention_backward"
    eff_bwd = "_scaled_dot_product_efficient_attention_backward"
    assert fast_stub.get("bwd", 0) + fast_ops.get(flash_bwd, 0) > 0
    assert fast_ops.get(eff_bwd, 0) == 0
    assert exact_stub.get("bwd", 0) == 0 and exact_ops.get(flash_bwd, 0) == 0
    assert exact_ops.get(eff_bwd, 0) > 0
    assert exact_stub.get("fwd", 0) + exact_ops.get("_scaled_dot_product_flash_attention", 0) > 0
