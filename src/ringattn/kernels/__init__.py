"""Local attention kernels: one rank, one (q-block, kv-block) pair.

A :class:`Kernel` is a pair of functions in SDPA layout:
``forward(q, k, v, *, causal, scale, mask) -> (out (b,h,sq,d), lse (b,h,sq) fp32)`` and
``backward(dout, q, k, v, out, lse, *, causal, scale, mask) -> (dq, dk, dv)`` where ``out`` and
``lse`` are the FINAL merged values of those query rows, and dk/dv come back with h_kv heads.
The ring loop and the strategies take a Kernel; they never look at the backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from . import fused
from .blockwise import blockwise_backward, blockwise_forward
from .mask import MaskSpec
from .merge import merge_

KERNELS = ("auto", "blockwise", "sdpa", "flash_attn")


@dataclass(frozen=True)
class Kernel:
    name: str
    forward: Callable
    backward: Callable


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
    if name == "auto":
        if cuda and dtype in (torch.float16, torch.bfloat16) and fused.flash_attn_available():
            name = "flash_attn"
        elif device.type in ("cpu", "cuda"):
            name = "sdpa"
        else:
            name = "blockwise"
    if name == "blockwise":
        return blockwise_kernel()
    if name == "flash_attn":
        if not fused.flash_attn_available():
            raise ValueError(
                "kernel='flash_attn' needs the flash_attn package and a CUDA device; "
                "install ringattn[flash] or use kernel='sdpa'"
            )
        return Kernel("flash_attn", fused.flash_forward, fused.flash_backward)
    if cuda:
        return Kernel("sdpa-cuda", fused.cuda_forward, fused.cuda_backward)
    if device.type == "cpu":
        return Kernel("sdpa-cpu", fused.cpu_forward, fused.cpu_backward)
    raise ValueError(f"kernel='sdpa' has no fused op for device {device}; use kernel='blockwise'")


__all__ = ["KERNELS", "Kernel", "MaskSpec", "blockwise_kernel", "get_kernel", "merge_"]
