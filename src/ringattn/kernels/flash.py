"""Adapter for the ``flash_attn`` package (>= 2.6): its low-level ``_flash_attn_forward`` /
``_flash_attn_backward``, which return the LSE and take dq/dk/dv buffers.

The call convention depends on the version, so it is decided from ``flash_attn.__version__``
(in 2.7+ both functions are ``torch.library.custom_op``s whose Python signature reads
``(*args, **kwargs)``, so ``inspect.signature`` cannot tell):

- 2.6: ``(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
  return_softmax) -> (out, q, k, v, out_padded, lse, S_dmask, rng_state)``; backward
  ``(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
  window_size, softcap, alibi_slopes, deterministic, rng_state=None) -> (dq, dk, dv, d)``.
- 2.7, 2.8: ``window_size`` becomes ``window_size_left, window_size_right`` (two ints); the
  forward returns ``(out, lse, S_dmask, rng_state)``; the backward writes dq/dk/dv in place
  and returns only ``softmax_d``.

Layout (b, s, h, d) with a contiguous last dim; lse (b, h, sq) fp32; fp16/bf16; GQA native
(K/V keep h_kv heads, dK/dV come back with h_kv heads); causal is bottom-right aligned, the
same as top-left on the square diagonal blocks it is given. Its backward needs head_dim % 8
== 0 (the forward pads, the raw backward does not), head_dim <= 256, and sm80+.
"""

from __future__ import annotations

import re

import torch

from .fused import check_causal, require
from .mask import MaskSpec

MIN_VERSION = (2, 6)
_HALF = (torch.float16, torch.bfloat16)


def flash_attn_version() -> tuple[int, int] | None:
    """(major, minor) of the importable ``flash_attn`` package, or None."""
    try:
        import flash_attn
    except ImportError:
        return None
    m = re.match(r"(\d+)\.(\d+)", str(getattr(flash_attn, "__version__", "")))
    return (int(m.group(1)), int(m.group(2))) if m else None


def gpu_has_sm80(device: torch.device) -> bool:
    """Ampere or newer: what flash kernels need. A host-side query, no sync."""
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 0)


def unavailable_reason(device: torch.device) -> str | None:
    """Why kernel='flash_attn' cannot run on ``device``, or None when it can."""
    version = flash_attn_version()
    if version is None:
        return "needs the flash_attn package (pip install ringattn[flash])"
    if version < MIN_VERSION:
        return f"needs flash-attn >= 2.6, found {version[0]}.{version[1]}"
    if device.type != "cuda" or not torch.cuda.is_available():
        return "needs a CUDA device"
    if not gpu_has_sm80(device):
        return "needs an sm80+ (Ampere or newer) GPU"
    return None


def flash_attn_available(device: torch.device | None = None) -> bool:
    return unavailable_reason(device or torch.device("cuda")) is None


def flash_fits(q: torch.Tensor, mask: MaskSpec | None) -> bool:
    """Whether flash_attn takes this block: no general mask, half precision, head_dim a
    multiple of 8 and <= 256 (shapes and dtype only, never values)."""
    d = q.shape[-1]
    return mask is None and q.dtype in _HALF and d % 8 == 0 and d <= 256


def _convention() -> tuple[dict, int]:
    """(the "no window" arguments, the lse's index in the forward's result) of the installed
    version: 2.7+ returns (out, lse, S_dmask, rng_state), 2.6 (out, q, k, v, out_padded,
    lse, S_dmask, rng_state)."""
    if flash_attn_version() >= (2, 7):
        return dict(window_size_left=-1, window_size_right=-1), 1
    return dict(window_size=(-1, -1)), 5


def _check(op: str, q, k, v, **more) -> None:
    """flash_attn's own checks (csrc flash_api.cpp), in its (b, s, h, d) layout."""
    require(q.dtype in _HALF, op, f"needs fp16/bf16, got {q.dtype}")
    b, _, h, d = q.shape
    require(d % 8 == 0 and d <= 256, op, f"head_dim {d}: needs a multiple of 8, <= 256")
    require(k.shape[0] == b and k.shape[3] == d and h % k.shape[2] == 0, op, "k shape")
    for name, t in (("q", q), ("k", k), ("v", v), *more.items()):
        require(t.dtype == q.dtype, op, f"{name} dtype {t.dtype} != {q.dtype}")
        require(t.stride(-1) == 1, op, f"{name} needs a contiguous last dim")


def _kw(scale: float, causal: bool) -> dict:
    """The keyword arguments flash_attn's forward and backward share (no dropout, softcap
    or ALiBi)."""
    return dict(dropout_p=0.0, softmax_scale=float(scale), causal=bool(causal), softcap=0.0,
                alibi_slopes=None)  # fmt: skip


def flash_forward(q, k, v, *, causal: bool, scale: float, mask=None):
    """q (b, h, sq, d), k/v (b, h_kv, sk, d) -> out (b, h, sq, d), lse (b, h, sq) fp32."""
    require(mask is None, "flash_attn", "takes no general mask (routed to the SDPA op)")
    check_causal(q, k, causal)
    from flash_attn import flash_attn_interface as fa

    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))  # (b, s, h, d) views
    _check("flash_attn forward", qs, ks, vs)
    window, lse_at = _convention()
    res = fa._flash_attn_forward(qs, ks, vs, **window, **_kw(scale, causal), return_softmax=False)
    return res[0].transpose(1, 2), res[lse_at]


def flash_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float, mask=None):
    """Gradients of one block from the FINAL out/lse of its rows; dk/dv with h_kv heads."""
    require(mask is None, "flash_attn", "takes no general mask (routed to the SDPA op)")
    check_causal(q, k, causal)
    from flash_attn import flash_attn_interface as fa

    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
    do, o = (t.to(q.dtype).transpose(1, 2) for t in (dout, out))
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (qs, ks, vs))
    lse = lse.contiguous()  # (b, h, sq) fp32, read by row index
    _check("flash_attn backward", qs, ks, vs, dout=do, out=o, dq=dq, dk=dk, dv=dv)
    b, sq, h, _ = qs.shape
    require(lse.dtype == torch.float32 and tuple(lse.shape) == (b, h, sq), "flash_attn", "lse")
    kw = dict(_kw(scale, causal), deterministic=False)
    # 2.7+ fills dq, dk, dv and returns softmax_d; 2.6 also returns them: use our buffers
    fa._flash_attn_backward(do, qs, ks, vs, o, lse, dq, dk, dv, **_convention()[0], **kw)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
