"""Local attention kernels: one rank, one (q-block, kv-block) pair.

A :class:`Kernel` is a pair of functions in SDPA layout:
``forward(q, k, v, *, causal, scale, mask) -> (out (b,h,sq,d), lse (b,h,sq) fp32)`` and
``backward(dout, q, k, v, out, lse, *, causal, scale, mask) -> (dq, dk, dv)`` where ``out`` and
``lse`` are the FINAL merged values of those query rows, and dk/dv come back with h_kv heads.
The ring loop and the strategies take a Kernel; they never look at the backend.

A Kernel may take only some blocks (``fits(q, mask)``, decided from shapes, dtype and mask,
never from values); :func:`routed_kernel` sends the others to a fallback, so no block ever
raises inside the ring after the ranks agreed to start (a raise on some ranks only would
leave the others waiting in a transfer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from . import flash, fused, sdpa_cuda
from .blockwise import blockwise_backward, blockwise_forward
from .mask import MaskSpec
from .merge import merge_

KERNELS = ("auto", "blockwise", "sdpa", "flash_attn")
# How half-precision blocks are differentiated (fp32 inputs are exact either way):
#   "exact": each block's backward runs in fp32 (inputs cast per block), so the W block
#            gradients are fp32 before they are summed: one rounding, at the end.
#   "fast":  each block's backward runs in the input dtype (bf16/fp16 block gradients, summed
#            in fp32), what flash-attn based rings do; faster where half matmuls are native.
#   "auto":  "fast" on CUDA (flash-attn's own backward accumulates in fp32 and its bf16 block
#            gradients cost < 2x naive error there), "exact" elsewhere (CPU: docs/precision.md).
GRAD_PRECISIONS = ("auto", "exact", "fast")
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Kernel:
    name: str
    forward: Callable
    backward: Callable
    fits: Callable | None = None  # (q (b, h, sq, d), mask) -> bool; None: every block


def routed_kernel(primary: Kernel, fallback: Kernel) -> Kernel:
    """``primary`` for the blocks it fits, ``fallback`` for the rest (e.g. masked pieces).
    Forward and backward of a block decide alike: same q shape, dtype and mask."""
    fits = primary.fits or (lambda q, mask: True)

    def forward(q, k, v, *, causal, scale, mask=None):
        kern = primary if fits(q, mask) else fallback
        return kern.forward(q, k, v, causal=causal, scale=scale, mask=mask)

    def backward(dout, q, k, v, out, lse, *, causal, scale, mask=None):
        kern = primary if fits(q, mask) else fallback
        return kern.backward(dout, q, k, v, out, lse, causal=causal, scale=scale, mask=mask)

    return Kernel(f"{primary.name}|{fallback.name}", forward, backward)


def flash_kernel() -> Kernel:
    """The flash_attn package alone: unmasked half-precision blocks, head_dim % 8 == 0."""
    return Kernel("flash_attn", flash.flash_forward, flash.flash_backward, flash.flash_fits)


def sdpa_cuda_kernel(sm80: bool) -> Kernel:
    """PyTorch's CUDA ops: the flash op where it fits (sm80+), else the efficient op."""
    return Kernel("sdpa-cuda", *sdpa_cuda.cuda_adapters(sm80))


def blockwise_kernel(block_size: int = 256) -> Kernel:
    return Kernel(
        f"blockwise[{block_size}]",
        partial(blockwise_forward, block_q=block_size, block_k=block_size),
        partial(blockwise_backward, block_q=block_size, block_k=block_size),
    )


def check_grad_precision(value: str) -> None:
    if value not in GRAD_PRECISIONS:
        raise ValueError(
            f"grad_precision={value!r} is unknown; choose one of {GRAD_PRECISIONS} "
            "('exact': fp32 block backward, 'fast': block gradients in the input dtype)"
        )


def resolve_grad_precision(value: str, device: torch.device) -> str:
    """``auto`` is ``fast`` on CUDA and ``exact`` elsewhere; ``exact``/``fast`` as given."""
    check_grad_precision(value)
    if value == "auto":
        return "fast" if device.type == "cuda" else "exact"
    return value


def exact_grads(kernel: Kernel) -> Kernel:
    """``kernel`` with its half-precision block backward run in fp32: q, k, v, out and dout
    (b, h, s, d) are cast per block, so dq/dk/dv come back fp32 and are rounded once, after
    the ring has summed them. On CUDA the fp32 blocks go to the efficient op (flash_attn and
    the flash op take only half precision, see ``fits``)."""

    def backward(dout, q, k, v, out, lse, *, causal, scale, mask=None):
        if q.dtype in _HALF:
            dout, q, k, v, out = (t.float() for t in (dout, q, k, v, out))
        return kernel.backward(dout, q, k, v, out, lse, causal=causal, scale=scale, mask=mask)

    return Kernel(f"{kernel.name}+exact-grads", kernel.forward, backward, kernel.fits)


def get_kernel(
    name: str | Kernel, device: torch.device, dtype: torch.dtype, grad_precision: str = "auto"
) -> Kernel:
    """Resolve ``kernel=`` and ``grad_precision=`` to a Kernel for tensors on ``device`` of
    ``dtype``. A Kernel instance is used as given unless grad_precision="exact"."""
    check_grad_precision(grad_precision)
    if isinstance(name, Kernel):
        kern = name
        precision = grad_precision
    else:
        kern = _named_kernel(name, device, dtype)
        precision = resolve_grad_precision(grad_precision, device)
    if precision == "exact" and dtype in _HALF:
        return exact_grads(kern)
    return kern


def _named_kernel(name: str, device: torch.device, dtype: torch.dtype) -> Kernel:
    if name not in KERNELS:
        raise ValueError(f"kernel={name!r} is unknown; choose one of {KERNELS}")
    cuda = device.type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        if cuda and half and flash.unavailable_reason(device) is None:
            name = "flash_attn"
        elif device.type in ("cpu", "cuda"):
            name = "sdpa"
        else:
            name = "blockwise"
    if name == "blockwise":
        return blockwise_kernel()
    if name == "flash_attn":
        reason = flash.unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"kernel='flash_attn' {reason}; use kernel='sdpa'")
        # masked pieces (documents, windows), fp32 and head dims it lacks go to the SDPA ops
        return routed_kernel(flash_kernel(), sdpa_cuda_kernel(sm80=True))
    if cuda:
        return sdpa_cuda_kernel(flash.gpu_has_sm80(device))
    if device.type == "cpu":
        return Kernel("sdpa-cpu", fused.cpu_forward, fused.cpu_backward)
    raise ValueError(f"kernel='sdpa' has no fused op for device {device}; use kernel='blockwise'")


__all__ = [
    "GRAD_PRECISIONS",
    "KERNELS",
    "Kernel",
    "check_grad_precision",
    "exact_grads",
    "MaskSpec",
    "blockwise_kernel",
    "flash_kernel",
    "get_kernel",
    "merge_",
    "resolve_grad_precision",
    "routed_kernel",
    "sdpa_cuda_kernel",
]
