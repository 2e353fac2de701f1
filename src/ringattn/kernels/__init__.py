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


def get_kernel(name: str | Kernel, device: torch.device, dtype: torch.dtype) -> Kernel:
    """Resolve ``kernel=`` to a Kernel for tensors on ``device`` of ``dtype``."""
    if isinstance(name, Kernel):
        return name
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
    "KERNELS",
    "Kernel",
    "MaskSpec",
    "blockwise_kernel",
    "flash_kernel",
    "get_kernel",
    "merge_",
    "routed_kernel",
    "sdpa_cuda_kernel",
]
