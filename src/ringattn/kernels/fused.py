"""Adapters for fused attention ops that return the LSE: this module (the CPU op and what
the adapters share), ``sdpa_cuda`` (PyTorch's CUDA ops) and ``flash`` (the flash_attn
package) are the ONLY modules that know backend and version quirks; everything else sees
``forward(q, k, v, causal, scale, mask)`` and ``backward(dout, q, k, v, out, lse, causal,
scale, mask)`` in (b, h, s, d) layout.

Quirks handled here (measured, see REFERENCE.md):
- CPU ``_scaled_dot_product_flash_attention_for_cpu``: ``is_causal`` is top-left aligned, so it
  is only used on square blocks; a row whose keys are all masked returns out = 0 and
  **lse = 0** (not -inf) and is patched; masks must be additive and of the query dtype; it
  takes GQA natively.
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


class KernelConstraintError(ValueError):
    """A fused op was about to be called with inputs it does not accept (a ringattn bug)."""


def require(cond: bool, op: str, what: str) -> None:
    """Check an op's constraint on shapes, strides or dtypes (never on tensor values)."""
    if not cond:
        raise KernelConstraintError(f"{op}: {what}")


def additive_mask(
    mask: MaskSpec | None, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(additive mask (sq, sk) in ``dtype``, empty-row flags (sq,)) or (None, None)."""
    if mask is None:
        return None, None
    allowed = mask.dense()
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    bias.masked_fill_(~allowed, float("-inf"))
    return bias, ~allowed.any(-1)


def check_causal(q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"fused kernels apply causal masks top-left; got a {q.shape[2]}x{k.shape[2]} block. "
            "Causal is only scheduled on square diagonal blocks."
        )


# ----------------------------------------------------------------------------- CPU


def cpu_forward(q, k, v, *, causal: bool, scale: float, mask: MaskSpec | None = None):
    check_causal(q, k, causal)
    compute = _cpu_compute_dtype(q.dtype)
    if compute != q.dtype:  # no bf16 units: fp32 block, fp32 out (merged in fp32 anyway)
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
    bias, empty = additive_mask(mask, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=bias, scale=scale
    )
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    if empty is not None and bool(empty.any()):
        lse = lse.masked_fill(empty, float("-inf"))  # the op says 0 for rows with no keys
    return out, lse


def cpu_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float, mask=None):
    check_causal(q, k, causal)
    compute = _cpu_compute_dtype(q.dtype)
    if compute != q.dtype:
        # No bf16 units: the op's half backward is emulated (~6x slower than fp32 here), so the
        # block runs in fp32. With them, half blocks arrive here only in grad_precision="fast"
        # ("exact" casts them to fp32 first: kernels.exact_grads).
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
    bias, _ = additive_mask(mask, q.dtype)
    # Rows with lse = -inf have out = 0; any finite lse gives them P = 0 as long as the mask
    # removes every key, and +inf guards the (impossible) unmasked case.
    lse = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).contiguous()
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.to(q.dtype), q, k, v, out.to(q.dtype), lse, 0.0, causal, attn_mask=bias, scale=scale
    )
    return dq, dk, dv
