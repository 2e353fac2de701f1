"""Adapters for fused attention ops that return the LSE. The ONLY module that knows backend
and version quirks; everything else sees ``forward(q, k, v, causal, scale, mask)`` and
``backward(dout, q, k, v, out, lse, causal, scale, mask)`` in (b, h, s, d) layout.

Quirks handled here (measured, see REFERENCE.md):
- CPU ``_scaled_dot_product_flash_attention_for_cpu``: ``is_causal`` is top-left aligned, so it
  is only used on square blocks; a row whose keys are all masked returns out = 0 and
  **lse = 0** (not -inf) and is patched; masks must be additive and of the query dtype.
- CUDA flash op: no GQA, so K/V heads are repeated *locally* (never on the wire) and the
  gradients summed back; fp32 goes through the memory-efficient op instead.
- ``flash_attn`` package: takes (b, s, h, d) and is bottom-right causal (same as top-left on
  the square blocks we give it).
"""

from __future__ import annotations

import functools

import torch

from .mask import MaskSpec

_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def cpu_half_is_native() -> bool:
    """Whether this CPU has bf16/fp16 matrix units (AMX, AVX512-BF16); decided once.

    Without them (e.g. AMD EPYC with AVX2 only) oneDNN emulates bf16 at ~0.3 GFLOP/s, about
    250x slower than fp32 (REFERENCE.md), so the CPU kernel computes half-precision blocks in
    fp32 there: the inputs are cast per block and the fp32 output is cast once at the end.
    """
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported", "_is_amx_fp16_supported")
    for name in probes:
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:
            continue
    return False


def _cpu_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU op runs in for inputs of ``dtype`` (forward)."""
    return torch.float32 if dtype in _HALF and not cpu_half_is_native() else dtype


def _additive(
    mask: MaskSpec | None, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(additive mask (sq, sk) in ``dtype``, empty-row flags (sq,)) or (None, None)."""
    if mask is None:
        return None, None
    allowed = mask.dense()
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    bias.masked_fill_(~allowed, float("-inf"))
    return bias, ~allowed.any(-1)


def _check_causal(q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"fused kernels apply causal masks top-left; got a {q.shape[2]}x{k.shape[2]} block. "
            "Causal is only scheduled on square diagonal blocks."
        )


# ----------------------------------------------------------------------------- CPU


def cpu_forward(q, k, v, *, causal: bool, scale: float, mask: MaskSpec | None = None):
    _check_causal(q, k, causal)
    compute = _cpu_compute_dtype(q.dtype)
    if compute != q.dtype:  # no bf16 units: fp32 block, fp32 out (merged in fp32 anyway)
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
    bias, empty = _additive(mask, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=bias, scale=scale
    )
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    if empty is not None and bool(empty.any()):
        lse = lse.masked_fill(empty, float("-inf"))  # the op says 0 for rows with no keys
    return out, lse


def cpu_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float, mask=None):
    _check_causal(q, k, causal)
    if q.dtype in _HALF:
        # The op returns half-precision block gradients; summed over W blocks their rounding
        # exceeded 2x a naive bf16 implementation's error (2.13x for dV over 40 seeds).
        # Computing the block backward in fp32 keeps "cast once at the end" (~1.5x slower).
        q, k, v = q.float(), k.float(), v.float()
    bias, _ = _additive(mask, q.dtype)
    # Rows with lse = -inf have out = 0; any finite lse gives them P = 0 as long as the mask
    # removes every key, and +inf guards the (impossible) unmasked case.
    lse = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).contiguous()
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.to(q.dtype), q, k, v, out.to(q.dtype), lse, 0.0, causal, attn_mask=bias, scale=scale
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------- CUDA (SDPA)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _fold_kv(dx: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return dx
    b, h, s, d = dx.shape
    return dx.view(b, h // groups, groups, s, d).sum(2)


def cuda_forward(q, k, v, *, causal: bool, scale: float, mask: MaskSpec | None = None):
    _check_causal(q, k, causal)
    g = q.shape[1] // k.shape[1]
    kr, vr = _repeat_kv(k, g), _repeat_kv(v, g)
    if mask is None and q.dtype in (torch.float16, torch.bfloat16):
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q, kr, vr, 0.0, causal, False, scale=scale
        )
        return res[0], res[1].float()
    bias, empty = _additive(mask, q.dtype)
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], *bias.shape)
    res = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, kr, vr, bias, True, 0.0, causal, scale=scale
    )
    lse = res[1][..., : q.shape[2]].float()  # the op pads lse to a multiple of 32
    if empty is not None:
        lse = lse.masked_fill(empty, float("-inf"))
    return res[0], lse


def cuda_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float, mask=None):
    _check_causal(q, k, causal)
    g = q.shape[1] // k.shape[1]
    kr, vr = _repeat_kv(k, g), _repeat_kv(v, g)
    dout, out = dout.to(q.dtype).contiguous(), out.to(q.dtype)
    lse = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).contiguous()
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    if mask is None and q.dtype in (torch.float16, torch.bfloat16):
        sq, sk = q.shape[2], k.shape[2]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, kr, vr, out, lse, None, None, sq, sk, 0.0, causal, zero, zero, scale=scale
        )
    else:
        bias, _ = _additive(mask, q.dtype)
        if bias is not None:
            bias = bias.expand(q.shape[0], q.shape[1], *bias.shape)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout,
            q,
            kr,
            vr,
            bias,
            out,
            lse,
            zero,
            zero,
            0.0,
            [True, True, True, False],
            causal,
            scale=scale,
        )
    return dq, _fold_kv(dk, g), _fold_kv(dv, g)


# ----------------------------------------------------------------------------- flash_attn


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def flash_forward(q, k, v, *, causal: bool, scale: float, mask=None):
    if mask is not None:
        raise ValueError("kernel='flash_attn' takes no general mask; use kernel='sdpa'")
    from flash_attn.flash_attn_interface import flash_attn_func

    out, lse, _ = flash_attn_func(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        softmax_scale=scale,
        causal=causal,
        return_attn_probs=True,
    )
    return out.transpose(1, 2), lse.float()


def flash_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float, mask=None):
    import inspect

    from flash_attn import flash_attn_interface as fi

    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    do = dout.to(q.dtype).transpose(1, 2).contiguous()
    o = out.to(q.dtype).transpose(1, 2).contiguous()
    dq, dk, dv = torch.empty_like(qs), torch.empty_like(ks), torch.empty_like(vs)
    params = inspect.signature(fi._flash_attn_backward).parameters
    kw = dict(
        dropout_p=0.0, softmax_scale=scale, causal=causal, alibi_slopes=None, deterministic=False
    )
    if "window_size_left" in params:  # flash-attn >= 2.7
        kw.update(window_size_left=-1, window_size_right=-1, softcap=0.0)
    else:
        kw.update(window_size=(-1, -1), softcap=0.0)
    fi._flash_attn_backward(do, qs, ks, vs, o, lse.contiguous(), dq, dk, dv, **kw)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
