"""What PyTorch's CUDA attention kernels demand of their inputs, checked on the meta device.

The ops' meta kernels compute output shapes only and accept anything; the real CUDA kernels
refuse (or read out of bounds) when these rules are broken. ``CudaOpRules`` is a dispatch
mode that checks every call of the four ops against the rules, independently of the checks
inside ringattn's adapters, and records what it saw. Sources: PyTorch's
aten/src/ATen/native/transformers/cuda/{attention.cu, attention_backward.cu, sdp_utils.cpp},
the vendored flash-attn ``mha_fwd``/``mha_bwd`` and the mem-efficient kernel's checks.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_HALF = (torch.float16, torch.bfloat16)


def _round(x: int, m: int) -> int:
    return (x + m - 1) // m * m


class RuleBroken(AssertionError):
    pass


def _rule(cond: bool, op: str, what: str) -> None:
    if not cond:
        raise RuleBroken(f"{op}: {what}")


class CudaOpRules(TorchDispatchMode):
    """Check the CUDA attention ops' input rules; ``calls`` counts them, ``kv_heads`` lists
    the key heads each flash / efficient call received (to see whether K/V were repeated)."""

    def __init__(self, capability: tuple[int, int] = (9, 0)):
        super().__init__()
        self.capability = capability
        self.calls: Counter = Counter()
        self.kv_heads: dict[str, list[int]] = {"flash": [], "efficient": []}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        check = {
            aten._scaled_dot_product_flash_attention.default: self._flash_fwd,
            aten._scaled_dot_product_flash_attention_backward.default: self._flash_bwd,
            aten._scaled_dot_product_efficient_attention.default: self._eff_fwd,
            aten._scaled_dot_product_efficient_attention_backward.default: self._eff_bwd,
        }.get(func)
        if check is not None:
            check(*args, **kwargs)
            self.calls[func.__name__.split(".")[0]] += 1
        return func(*args, **kwargs)

    # --------------------------------------------------------------- shared

    @staticmethod
    def _qkv(op, q, k, v, dtypes, *, gqa: bool) -> None:
        _rule(all(t.dim() == 4 for t in (q, k, v)), op, "q, k, v must be (b, h, s, d)")
        _rule(q.dtype in dtypes, op, f"dtype {q.dtype} not in {dtypes}")
        _rule(k.dtype == q.dtype and v.dtype == q.dtype, op, "q, k, v dtypes differ")
        for name, t in (("q", q), ("k", k), ("v", v)):
            _rule(t.stride(-1) == 1, op, f"{name} needs a contiguous last dimension")
        _rule(k.shape == v.shape and k.shape[0] == q.shape[0], op, "k/v shape mismatch")
        _rule(k.shape[3] == q.shape[3], op, "head dims differ")
        if gqa:
            _rule(q.shape[1] % k.shape[1] == 0, op, "kv heads must divide q heads")
        else:
            _rule(k.shape[1] == q.shape[1], op, f"no GQA: k has {k.shape[1]} heads, q {q.shape[1]}")

    @staticmethod
    def _out_like_q(op, q, **tensors) -> None:
        for name, t in tensors.items():
            _rule(t.dtype == q.dtype, op, f"{name} dtype {t.dtype} != {q.dtype}")
            _rule(t.shape == q.shape, op, f"{name} shape {tuple(t.shape)} != {tuple(q.shape)}")
            _rule(t.stride(-1) == 1, op, f"{name} needs a contiguous last dimension")

    def _flash_rules(self, op, q, k, v, dropout_p) -> None:
        # flash: GQA native on CUDA (sdp_utils: check_batch_size_and_num_heads_dense<true>)
        self._qkv(op, q, k, v, _HALF, gqa=True)
        d = q.shape[3]
        _rule(d % 8 == 0 and d <= 256, op, f"head_dim {d} must be a multiple of 8 and <= 256")
        _rule(self.capability >= (8, 0), op, f"needs sm80+, this GPU is sm{self.capability}")
        _rule(dropout_p == 0.0, op, "dropout must be 0")
        self.kv_heads["flash"].append(k.shape[1])

    def _eff_rules(self, op, q, k, v, bias, dropout_p) -> None:
        # efficient: no GQA (check_batch_size_and_num_heads_dense<false>); head_dim aligned
        # to 16 bytes (minimum_gemm_alignment on sm80+)
        self._qkv(op, q, k, v, (*_HALF, torch.float32), gqa=False)
        align = 16 // q.element_size()
        _rule(q.shape[3] % align == 0, op, f"head_dim {q.shape[3]} must be a multiple of {align}")
        _rule(dropout_p == 0.0, op, "dropout must be 0")
        b, h, sq, _ = q.shape
        if bias is not None:
            sk = k.shape[2]
            _rule(bias.dtype == q.dtype, op, f"bias dtype {bias.dtype} != {q.dtype}")
            _rule(tuple(bias.shape) == (b, h, sq, sk), op, f"bias shape {tuple(bias.shape)}")
            _rule(bias.stride(-1) == 1, op, "bias needs a contiguous last dimension")
            bad = [s for s in bias.stride()[:-1] if s % 16 != 0]
            _rule(not bad, op, f"bias strides {bias.stride()} must be multiples of 16 elements")
        self.kv_heads["efficient"].append(k.shape[1])

    # --------------------------------------------------------------- ops

    def _flash_fwd(self, q, k, v, dropout_p=0.0, is_causal=False, debug=False, *, scale=None):
        op = "flash forward"
        self._flash_rules(op, q, k, v, dropout_p)
        _rule(not is_causal or q.shape[2] == k.shape[2], op, "causal on a non-square block")

    def _flash_bwd(
        self, dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout_p, is_causal,
        seed, offset, *, scale=None,
    ):  # fmt: skip
        op = "flash backward"
        self._flash_rules(op, q, k, v, dropout_p)
        self._out_like_q(op, q, out=out, grad_out=dout)
        b, h, sq, _ = q.shape
        _rule((max_q, max_k) == (sq, k.shape[2]), op, "max_q/max_k must be the lengths")
        _rule(lse.dtype == torch.float32, op, "lse must be fp32")
        _rule(tuple(lse.shape) == (b, h, sq), op, f"lse must be {(b, h, sq)}, got {lse.shape}")
        _rule(lse.is_contiguous(), op, "lse must be contiguous")

    def _eff_fwd(self, q, k, v, bias, compute_lse, dropout_p=0.0, is_causal=False, *, scale=None):
        op = "efficient forward"
        self._eff_rules(op, q, k, v, bias, dropout_p)
        _rule(compute_lse is True, op, "compute_log_sumexp must be True (the ring needs lse)")

    def _eff_bwd(
        self, dout, q, k, v, bias, out, lse, seed, offset, dropout_p, mask, is_causal=False,
        *, scale=None,
    ):  # fmt: skip
        op = "efficient backward"
        self._eff_rules(op, q, k, v, bias, dropout_p)
        self._out_like_q(op, q, out=out, grad_out=dout)
        b, h, sq, _ = q.shape
        rows = _round(sq, 32)  # the kernel reads the LSE in tiles of 32 rows per head
        _rule(lse.dtype == torch.float32, op, "lse must be fp32")
        _rule(tuple(lse.shape) == (b, h, rows), op, f"lse must be {(b, h, rows)}, got {lse.shape}")
        _rule(lse.is_contiguous(), op, "lse must be contiguous")
        _rule(not mask[3], op, "no bias gradient is wanted")


# ----------------------------------------------------------------------------- numbers on CPU


def _reference(q, k, v, bias, causal, scale):
    """fp32 scores and probabilities (b, h, sq, sk) and lse (b, h, sq); K/V heads repeated
    here when the op takes GQA. Rows with no key get lse -inf and NaN probabilities."""
    g = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = q.float() @ kf.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.float()
    if causal:  # top-left, square blocks only (checked by the rules)
        sq, sk = s.shape[-2:]
        s = s.masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(1), float("-inf"))
    return s, kf, vf


def _ref_forward(q, k, v, bias, causal, scale):
    s, _, vf = _reference(q, k, v, bias, causal, scale)
    lse = s.logsumexp(-1)
    return (torch.exp(s - lse.unsqueeze(-1)) @ vf).to(q.dtype), lse


def _ref_backward(dout, q, k, v, bias, out, lse, causal, scale):
    """The kernels' backward from the given (final) out and lse: dS = P * (dP - rowsum(dO*O))."""
    s, kf, vf = _reference(q, k, v, bias, causal, scale)
    p = torch.exp(s - lse[..., : q.shape[2]].unsqueeze(-1))
    do = dout.float()
    ds = p * (do @ vf.transpose(-1, -2) - (do * out.float()).sum(-1, keepdim=True))
    dq, dk, dv = ds @ kf * scale, ds.transpose(-1, -2) @ q.float() * scale, p.transpose(-1, -2) @ do
    b, hk, sk, d = k.shape
    fold = lambda x: x.view(b, hk, -1, sk, x.shape[-1]).sum(2)  # noqa: E731
    return dq.to(q.dtype), fold(dk).to(q.dtype), fold(dv).to(q.dtype)


def install_reference_ops(monkeypatch, rules: CudaOpRules) -> None:
    """Replace the four CUDA ops by CPU references that first check ``rules``. The efficient
    forward pads its LSE to 32 rows with NaN, and every op writes NaN into rows with no key,
    so an adapter that reads the padding or trusts those rows fails the comparison."""
    zero = torch.zeros((), dtype=torch.int64)

    def flash_fwd(q, k, v, dropout_p=0.0, is_causal=False, debug=False, *, scale=None):
        rules._flash_fwd(q, k, v, dropout_p, is_causal, debug, scale=scale)
        rules.calls["_scaled_dot_product_flash_attention"] += 1
        out, lse = _ref_forward(q, k, v, None, is_causal, scale)
        return out, lse, None, None, q.shape[2], k.shape[2], zero, zero, None

    def flash_bwd(dout, q, k, v, out, lse, cq, ck, mq, mk, p, is_causal, s0, s1, *, scale=None):
        rules._flash_bwd(dout, q, k, v, out, lse, cq, ck, mq, mk, p, is_causal, s0, s1, scale=scale)
        rules.calls["_scaled_dot_product_flash_attention_backward"] += 1
        return _ref_backward(dout, q, k, v, None, out, lse, is_causal, scale)

    def eff_fwd(q, k, v, bias, compute_lse, dropout_p=0.0, is_causal=False, *, scale=None):
        rules._eff_fwd(q, k, v, bias, compute_lse, dropout_p, is_causal, scale=scale)
        rules.calls["_scaled_dot_product_efficient_attention"] += 1
        out, lse = _ref_forward(q, k, v, bias, is_causal, scale)
        padded = torch.full((*lse.shape[:2], _round(lse.shape[2], 32)), float("nan"))
        padded[..., : lse.shape[2]] = lse
        return out, padded, zero, zero

    def eff_bwd(dout, q, k, v, bias, out, lse, s0, s1, p, mask, is_causal=False, *, scale=None):
        rules._eff_bwd(dout, q, k, v, bias, out, lse, s0, s1, p, mask, is_causal, scale=scale)
        rules.calls["_scaled_dot_product_efficient_attention_backward"] += 1
        return (*_ref_backward(dout, q, k, v, bias, out, lse, is_causal, scale), None)

    for name, fn in (
        ("_scaled_dot_product_flash_attention", flash_fwd),
        ("_scaled_dot_product_flash_attention_backward", flash_bwd),
        ("_scaled_dot_product_efficient_attention", eff_fwd),
        ("_scaled_dot_product_efficient_attention_backward", eff_bwd),
    ):
        monkeypatch.setattr(torch.ops.aten, name, fn)
