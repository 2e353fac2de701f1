"""SwiGLU feed-forward, plain or blockwise (the Blockwise Parallel Transformer FFN).

``SwiGLU(x) = w2(silu(w1 x) * w3 x)`` with ``x (b, s, dim)`` and a hidden layer of width
``hidden``. The hidden activations are ``b * s * hidden`` (~2.7x the input), and a plain
autograd graph keeps three of them per layer (``w1 x``, ``w3 x`` and their product) until
backward. At long context that, not attention, dominates activation memory.

:func:`blockwise_ffn` runs the FFN ``chunk`` tokens at a time along the sequence and keeps
only its input ``x`` for backward; backward recomputes each chunk's hidden activations and
accumulates the weight gradients chunk by chunk. Live FFN activation memory is then
``O(b * chunk * hidden)`` instead of ``O(b * s * hidden)``, for one extra pair of matmuls
(``w1 x`` and ``w3 x``) per chunk in backward. The FFN acts on each token independently, so
chunking changes no result beyond float summation order in the weight gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwiGLU", "blockwise_ffn", "swiglu"]


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Plain SwiGLU ``w2(silu(w1 x) * w3 x)``; x ``(..., dim)`` -> ``(..., dim)``."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(b, c, n) -> (b * c, n): the token axis for a weight-gradient matmul."""
    return t.reshape(-1, t.shape[-1])


class _BlockwiseFFN(torch.autograd.Function):
    """Chunked SwiGLU that saves ``x`` and the weights only; see :func:`blockwise_ffn`."""

    @staticmethod
    def forward(ctx, x, w1, w3, w2, chunk):  # type: ignore[override]
        # Autograd is off inside forward, so nothing per chunk is kept alive.
        ctx.save_for_backward(x, w1, w3, w2)
        ctx.chunk = chunk
        outs = [swiglu(x[:, i : i + chunk], w1, w3, w2) for i in range(0, x.shape[1], chunk)]
        return torch.cat(outs, dim=1)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, w1, w3, w2 = ctx.saved_tensors
        chunk = ctx.chunk
        need_x, need_w1, need_w3, need_w2, _ = ctx.needs_input_grad
        # Weight grads are sums over every chunk: accumulate them in fp32 or wider (a bf16
        # running sum would lose precision with the number of chunks) and cast once at the
        # end. Each chunk's matmul still rounds to the input dtype (CPU has no mm with an fp32
        # output for bf16 inputs), an error no larger than the plain FFN's single matmul.
        acc_dtype = lambda w: torch.promote_types(w.dtype, torch.float32)
        acc = lambda w, need: torch.zeros_like(w, dtype=acc_dtype(w)) if need else None
        gw1, gw3, gw2 = acc(w1, need_w1), acc(w3, need_w3), acc(w2, need_w2)
        gx_chunks = []
        for i in range(0, x.shape[1], chunk):
            xc = x[:, i : i + chunk]  # (b, c, dim)
            go = grad_out[:, i : i + chunk]  # (b, c, dim)
            # Recompute this chunk's hidden activations, each (b, c, hidden).
            a = F.linear(xc, w1)
            u = F.linear(xc, w3)
            sig = torch.sigmoid(a)
            sa = a * sig  # silu(a)
            gh = torch.matmul(go, w2)  # d(out)/d(h): (b, c, hidden)
            if need_w2:
                gw2 += (_flat(go).t() @ _flat(sa * u)).to(gw2.dtype)
            gu = gh * sa
            ga = gh * u * (sig * (1 + a * (1 - sig)))  # silu'(a) = sig * (1 + a (1 - sig))
            if need_w1:
                gw1 += (_flat(ga).t() @ _flat(xc)).to(gw1.dtype)
            if need_w3:
                gw3 += (_flat(gu).t() @ _flat(xc)).to(gw3.dtype)
            if need_x:
                gx_chunks.append(torch.matmul(ga, w1) + torch.matmul(gu, w3))
        gx = torch.cat(gx_chunks, dim=1) if need_x else None
        cast = lambda g, w: None if g is None else g.to(w.dtype)
        return gx, cast(gw1, w1), cast(gw3, w3), cast(gw2, w2), None


def blockwise_ffn(
    x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, chunk: int
) -> torch.Tensor:
    """SwiGLU over ``x (b, s, dim)`` computed ``chunk`` tokens at a time along dim 1.

    Args:
        x: input ``(b, s, dim)``.
        w1: gate weight ``(hidden, dim)``; ``w3``: up weight ``(hidden, dim)``;
            ``w2``: down weight ``(dim, hidden)`` -- the ``nn.Linear.weight`` layouts.
        chunk: tokens per chunk; the last chunk may be shorter when it does not divide ``s``.

    Returns:
        ``(b, s, dim)``, equal to :func:`swiglu` in forward and backward.

    Only ``x`` (and the weights, which are parameters anyway) is saved for backward. The
    weights are used exactly as handed in, so FSDP's unsharded parameters work; under
    tensor parallelism pass either DTensors throughout or the local shards (w1/w3 sharded on
    ``hidden``, w2 on its input dim) and all-reduce the partial output, as for the plain FFN.
    """
    if chunk <= 0:
        raise ValueError(f"blockwise_ffn chunk must be positive, got {chunk}")
    if x.dim() != 3:
        raise ValueError(f"blockwise_ffn expects x of shape (b, s, dim), got {tuple(x.shape)}")
    return _BlockwiseFFN.apply(x, w1, w3, w2, chunk)


class SwiGLU(nn.Module):
    """LLaMA feed-forward: ``w2(silu(w1 x) * w3 x)``; ``(b, s, dim) -> (b, s, dim)``.

    ``chunk=None`` calls the three ``nn.Linear`` modules (so per-module hooks, e.g. tensor
    parallel plans, see them); an integer switches to :func:`blockwise_ffn` on the module's
    current weight tensors. Sequences no longer than ``chunk`` take the plain path.
    """

    def __init__(self, dim: int, hidden: int, chunk: int | None = None) -> None:
        super().__init__()
        if chunk is not None and chunk <= 0:
            raise ValueError(f"SwiGLU chunk must be positive or None, got {chunk}")
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunk is None or x.shape[1] <= self.chunk:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return blockwise_ffn(x, self.w1.weight, self.w3.weight, self.w2.weight, self.chunk)

    def extra_repr(self) -> str:
        return f"chunk={self.chunk}"
