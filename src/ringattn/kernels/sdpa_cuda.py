"""Adapters for PyTorch's CUDA attention ops that return the LSE (SDPA layout (b, h, s, d)).

Two ops, chosen per block from shapes, dtype, mask and GPU, never from tensor values:
- flash (``_scaled_dot_product_flash_attention``): fp16/bf16, head_dim % 8 == 0 and <= 256,
  sm80+, no mask (causal only on square diagonal blocks). It takes GQA natively (the
  vendored flash-attn kernel checks ``h % h_kv == 0``, and SDPA's dispatch uses
  ``check_batch_size_and_num_heads_dense<true>``): K/V keep their h_kv heads and dK/dV come
  back with h_kv heads. On ROCm the flash op has no GQA, so K/V are repeated there.
- efficient (``_scaled_dot_product_efficient_attention``): everything else (fp32, masks,
  other head dims, older GPUs). It has NO GQA (``<false>`` in SDPA's dispatch; the kernel
  needs equal head counts), so K/V heads are repeated *locally* (never on the wire) and the
  gradients summed back. Its kernels need a head_dim that is a multiple of 16 bytes (SDPA
  pads it the same way), an additive bias whose rows start every 16 elements (allocate
  padded, slice the view), and its backward reads the LSE as the forward returned it:
  (b, h, sq rounded up to 32) fp32.

The meta kernels of these ops check none of this; ``check_*`` below do, inside the adapters,
so a shape/stride/dtype bug fails on CPU (tests run the ring on the meta device).
No host syncs: nothing here reads a tensor value on the host.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from .fused import KernelConstraintError, additive_mask, check_causal, require
from .mask import MaskSpec

__all__ = ["KernelConstraintError", "check_efficient", "check_efficient_lse", "check_flash"]

_HALF = (torch.float16, torch.bfloat16)
_EFFICIENT_DTYPES = (*_HALF, torch.float32)
LSE_ROWS = 32  # the efficient op's LSE rows per head are padded to this multiple
BIAS_ALIGN = 16  # elements between the starts of two rows of the efficient op's bias


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _flash_gqa_native() -> bool:
    return torch.version.hip is None


def flash_op_fits(q: torch.Tensor, mask: MaskSpec | None, sm80: bool) -> bool:
    """Whether the flash op takes this block (shapes and dtype only)."""
    d = q.shape[-1]
    return mask is None and sm80 and q.dtype in _HALF and d % 8 == 0 and d <= 256


def _efficient_align(dtype: torch.dtype) -> int:
    return 16 // dtype.itemsize  # 8 for fp16/bf16, 4 for fp32


# ----------------------------------------------------------------------------- checks


def _check_qkv(op: str, q, k, v, dtypes, *, gqa: bool) -> None:
    require(q.dtype in dtypes, op, f"dtype {q.dtype} is not one of {dtypes}")
    require(k.dtype == q.dtype and v.dtype == q.dtype, op, "q, k, v must share a dtype")
    for name, t in (("q", q), ("k", k), ("v", v)):
        require(t.dim() == 4, op, f"{name} must be (b, h, s, d), got {tuple(t.shape)}")
        require(t.stride(-1) == 1, op, f"{name} needs a contiguous last dim, {t.stride()}")
    require(k.shape == v.shape and k.shape[0] == q.shape[0], op, "k/v shapes must match q's")
    require(k.shape[3] == q.shape[3], op, "q and k head dims differ")
    if gqa:
        require(q.shape[1] % k.shape[1] == 0, op, "kv heads must divide q heads")
    else:
        require(k.shape[1] == q.shape[1], op, f"no GQA: q has {q.shape[1]} heads, k {k.shape[1]}")


def check_flash(q, k, v) -> None:
    d = q.shape[-1]
    _check_qkv("flash op", q, k, v, _HALF, gqa=_flash_gqa_native())
    require(d % 8 == 0 and d <= 256, "flash op", f"head_dim {d}: needs a multiple of 8, <= 256")


def check_efficient(q, k, v, bias) -> None:
    op = "efficient op"
    _check_qkv(op, q, k, v, _EFFICIENT_DTYPES, gqa=False)
    align = _efficient_align(q.dtype)
    require(q.shape[3] % align == 0, op, f"head_dim {q.shape[3]}: needs a multiple of {align}")
    if bias is None:
        return
    b, h, sq, _ = q.shape
    require(tuple(bias.shape) == (b, h, sq, k.shape[2]), op, f"bias shape {tuple(bias.shape)}")
    require(bias.dtype == q.dtype, op, f"bias dtype {bias.dtype} != {q.dtype}")
    require(bias.stride(-1) == 1, op, "bias needs a contiguous last dim")
    require(
        all(s % BIAS_ALIGN == 0 for s in bias.stride()[:-1]),
        op,
        f"bias strides {bias.stride()} must be multiples of {BIAS_ALIGN} elements",
    )


def check_efficient_lse(q, lse) -> None:
    b, h, sq, _ = q.shape
    want = (b, h, sq if torch.version.hip else _round_up(sq, LSE_ROWS))
    op = "efficient op backward"
    require(lse.dtype == torch.float32, op, f"lse must be fp32, got {lse.dtype}")
    require(tuple(lse.shape) == want, op, f"lse must be {want} (rows padded to a multiple of 32)")
    require(lse.is_contiguous(), op, "lse must be contiguous")


def _check_like_q(op: str, q, **tensors) -> None:
    for name, t in tensors.items():
        require(t.dtype == q.dtype and t.shape == q.shape, op, f"{name} must match q")
        require(t.stride(-1) == 1, op, f"{name} needs a contiguous last dim")


# ----------------------------------------------------------------------------- helpers


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _fold_kv(dx: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return dx
    b, h, s, d = dx.shape
    return dx.view(b, h // groups, groups, s, d).sum(2)


def _pad_d(x: torch.Tensor, d: int) -> torch.Tensor:
    """Zero-pad the head dim to ``d``: zero q/k columns leave the scores unchanged and zero
    v columns add output columns that are sliced away (the scale is passed explicitly)."""
    return x if x.shape[-1] == d else F.pad(x, (0, d - x.shape[-1]))


def _bias(mask: MaskSpec | None, q: torch.Tensor, sk: int):
    """(additive bias (b, h, sq, sk) whose rows start every 16 elements, empty-row flags
    (sq,)) or (None, None). The bias is a (sq, sk rounded up to 16) buffer sliced to sk
    columns and expanded (stride 0) over batch and heads."""
    if mask is None:
        return None, None
    sq = q.shape[2]
    buf = torch.empty(sq, _round_up(sk, BIAS_ALIGN), dtype=q.dtype, device=q.device)
    dense, empty = additive_mask(mask, q.dtype)
    bias = buf[:, :sk]
    bias.copy_(dense)
    return bias.expand(q.shape[0], q.shape[1], sq, sk), empty


def _efficient_inputs(q, k, v, mask):
    """q, k, v repeated to q's heads with head dims padded; bias; empty rows; groups; d."""
    g, d = q.shape[1] // k.shape[1], q.shape[-1]
    dp = _round_up(d, _efficient_align(q.dtype))
    qp, kp, vp = (_pad_d(t, dp) for t in (q, _repeat_kv(k, g), _repeat_kv(v, g)))
    return qp, kp, vp, *_bias(mask, q, k.shape[2]), g, d


# ----------------------------------------------------------------------------- adapters


def cuda_forward(q, k, v, *, causal: bool, scale: float, mask=None, sm80: bool = True):
    """q (b, h, sq, d), k/v (b, h_kv, sk, d) -> out (b, h, sq, d), lse (b, h, sq) fp32."""
    check_causal(q, k, causal)
    if flash_op_fits(q, mask, sm80):
        g = 1 if _flash_gqa_native() else q.shape[1] // k.shape[1]
        kr, vr = _repeat_kv(k, g), _repeat_kv(v, g)
        check_flash(q, kr, vr)
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q, kr, vr, 0.0, causal, False, scale=scale
        )
        return res[0], res[1]  # lse (b, h, sq) fp32
    qp, kp, vp, bias, empty, _, d = _efficient_inputs(q, k, v, mask)
    check_efficient(qp, kp, vp, bias)
    res = torch.ops.aten._scaled_dot_product_efficient_attention(
        qp, kp, vp, bias, True, 0.0, causal, scale=scale
    )
    out, lse = res[0][..., :d], res[1][..., : q.shape[2]]  # lse rows padded to 32
    if empty is not None:
        # rows whose keys are all masked: out 0 and lse -inf whatever the kernel wrote there
        # (masked_fill with the (sq,) flags, no host sync)
        out = out.masked_fill(empty.unsqueeze(-1), 0.0)
        lse = lse.masked_fill(empty, float("-inf"))
    return out, lse


def _lse_for_backward(lse: torch.Tensor, rows: int) -> torch.Tensor:
    """(b, h, sq) final lse -> contiguous (b, h, rows) fp32; -inf (rows with no key) and the
    padding become +inf, which gives them P = exp(s - inf) = 0."""
    b, h, sq = lse.shape
    out = torch.full((b, h, rows), float("inf"), dtype=torch.float32, device=lse.device)
    out[..., :sq] = torch.where(torch.isneginf(lse), float("inf"), lse)
    return out


def cuda_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float, mask=None, sm80=True):
    """Gradients (dq, dk, dv) of one block from the FINAL out/lse of its query rows; dk/dv
    come back with h_kv heads."""
    check_causal(q, k, causal)
    dout, out = dout.to(q.dtype), out.to(q.dtype)
    zero = torch.zeros((), dtype=torch.int64, device=q.device)  # rng: unused without dropout
    sq, sk = q.shape[2], k.shape[2]
    if flash_op_fits(q, mask, sm80):
        g = 1 if _flash_gqa_native() else q.shape[1] // k.shape[1]
        kr, vr = _repeat_kv(k, g), _repeat_kv(v, g)
        lse = _lse_for_backward(lse, sq)
        check_flash(q, kr, vr)
        _check_like_q("flash op backward", q, out=out, grad_out=dout)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, kr, vr, out, lse, None, None, sq, sk, 0.0, causal, zero, zero, scale=scale
        )
        return dq, _fold_kv(dk, g), _fold_kv(dv, g)
    qp, kp, vp, bias, _, g, d = _efficient_inputs(q, k, v, mask)
    dp = qp.shape[-1]
    dout, out = _pad_d(dout, dp), _pad_d(out, dp)
    lse = _lse_for_backward(lse, sq if torch.version.hip else _round_up(sq, LSE_ROWS))
    check_efficient(qp, kp, vp, bias)
    check_efficient_lse(qp, lse)
    _check_like_q("efficient op backward", qp, out=out, grad_out=dout)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, qp, kp, vp, bias, out, lse, zero, zero, 0.0, [True, True, True, False], causal,
        scale=scale,
    )  # fmt: skip
    dq, dk, dv = dq[..., :d], dk[..., :d], dv[..., :d]
    return dq, _fold_kv(dk, g), _fold_kv(dv, g)


def cuda_adapters(sm80: bool) -> tuple:
    """(forward, backward) for a GPU with (``sm80=True``) or without the flash op."""
    return partial(cuda_forward, sm80=sm80), partial(cuda_backward, sm80=sm80)
