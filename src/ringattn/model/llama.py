"""A LLaMA-style decoder-only transformer with the attention function injected.

The model holds no distributed code. Context parallelism enters through two seams only:

* ``attn_fn(q, k, v, causal=True) -> out``, flash-attn layout: q ``(b, s, h, hd)``, k/v
  ``(b, s, h_kv, hd)`` (kv heads are never repeated here; GQA is the kernel's job), out
  ``(b, s, h, hd)``. A ring / all-gather / Ulysses strategy is just another ``attn_fn``.
* ``positions``: the *global* token positions held by this rank, ``(s,)`` or ``(b, s)``.
  RoPE is computed from them on the fly, so a zigzag or striped shard, or packed documents
  whose positions restart, get exactly the rotations they would have unsharded.

Module names follow torchtitan (``tok_embeddings``, ``layers.i.attention.wq``,
``layers.i.feed_forward.w1``, ``norm``, ``output``) so tensor-parallel plans can address them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ringattn.ffn import SwiGLU
from ringattn.model.config import ModelConfig
from ringattn.model.init import normal_box_

AttnFn = Callable[..., torch.Tensor]
# p -> (the tensor to fill, the global shape, the box's offset in it)
BoxFn = Callable[[torch.Tensor], tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]]


def _whole(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    return p, tuple(p.shape), (0,) * p.dim()


__all__ = [
    "AttnFn",
    "BoxFn",
    "Attention",
    "Block",
    "RMSNorm",
    "Transformer",
    "apply_rope",
    "rope_cos_sin",
    "sdpa_attention",
]


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True
) -> torch.Tensor:
    """Local attention on the whole sequence: q ``(b, s, h, hd)``, k/v ``(b, s, h_kv, hd)``.

    SDPA wants ``(b, h, s, d)``; ``enable_gqa`` lets it broadcast kv heads without a copy.
    Its causal mask is top-left aligned, which is right here because q and k are the same
    tokens. Returns ``(b, s, h, hd)``.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
    )
    return out.transpose(1, 2)


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, computed in fp32 and cast back to x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for explicit positions.

    Args:
        positions: long ``(s,)`` or ``(b, s)``: global positions of the tokens held here.
        head_dim: even head dimension ``hd``.

    Returns:
        ``cos, sin``, fp32, shaped ``(1 or b, s, 1, hd // 2)`` to broadcast over heads.

    The angle ``pos * theta**(-2i/hd)`` is formed in float64: in fp32 its rounding error grows
    with the position (~0.06 rad at 1M), which would make the relative-position property
    inexact exactly where context parallelism is used.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64)
    inv_freq = theta ** (-exponent / head_dim)  # (hd/2,)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (s | b s, hd/2)
    if angles.dim() == 2:
        angles = angles[None]
    angles = angles[:, :, None, :]  # (1 | b, s, 1, hd/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (b, s, h, hd)`` by RoPE, LLaMA (interleaved-pair) convention.

    Pairs ``(x[2i], x[2i+1])`` are rotated by angle ``pos * theta**(-2i/hd)``; computed in fp32
    (or x's dtype if wider) and cast back.
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]  # (b, s, h, hd/2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """GQA self-attention: projections, RoPE, then the injected ``attn_fn``."""

    def __init__(self, cfg: ModelConfig, attn_fn: AttnFn | None = None) -> None:
        super().__init__()
        hd = cfg.head_dim
        self.head_dim = hd
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.attn_fn: AttnFn = attn_fn or sdpa_attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x (b, s, dim)`` -> ``(b, s, dim)``; ``cos/sin`` from :func:`rope_cos_sin`."""
        b, s, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds only its share of the heads.
        q = self.wq(x).view(b, s, -1, self.head_dim)  # (b, s, h, hd)
        k = self.wk(x).view(b, s, -1, self.head_dim)  # (b, s, h_kv, hd)
        v = self.wv(x).view(b, s, -1, self.head_dim)  # (b, s, h_kv, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.attn_fn(q, k, v, causal=True)  # (b, s, h, hd)
        return self.wo(out.reshape(b, s, -1))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``h + ffn(norm(h))``.

    ``ac = True`` (set by :func:`ringattn.parallel.ac.apply_ac`) recomputes the block in
    backward via non-reentrant checkpointing; it is a flag rather than a wrapper module so
    state_dict keys stay the same with and without it.
    """

    def __init__(self, layer_id: int, cfg: ModelConfig, attn_fn: AttnFn | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(cfg, attn_fn)
        self.feed_forward = SwiGLU(cfg.dim, cfg.hidden, cfg.ffn_chunk)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ac = False

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x (b, s, dim)`` -> ``(b, s, dim)``."""
        if self.ac and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False)
        return self._forward(x, cos, sin)


class Transformer(nn.Module):
    """Decoder-only LLaMA: ``tokens (b, s) -> logits (b, s, vocab)``.

    Build on the ``meta`` device for planning (``cfg.n_params()`` parameters); parameters are
    initialised by :meth:`init_weights` (called with seed 0 at construction).
    """

    def __init__(self, cfg: ModelConfig, attn_fn: AttnFn | None = None) -> None:
        super().__init__()
        if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.kv_heads:
            raise ValueError(
                f"need dim % n_heads == 0 and n_heads % n_kv_heads == 0, got dim={cfg.dim}, "
                f"n_heads={cfg.n_heads}, n_kv_heads={cfg.kv_heads}"
            )
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg, attn_fn) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights(seed=0)

    def set_attention(self, attn_fn: AttnFn | None) -> None:
        """Use ``attn_fn`` (None: :func:`sdpa_attention`) in every layer from now on."""
        for layer in self.layers:
            layer.attention.attn_fn = attn_fn or sdpa_attention

    def tie_weights(self) -> None:
        """Share the embedding with the output head if ``cfg.tie_embeddings``.

        Re-run after ``to_empty()``: moving off the meta device replaces each parameter
        separately, which unties them.
        """
        if self.cfg.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: int = 0, box_of: BoxFn | None = None) -> None:
        """Deterministic init: the same seed gives the same weights on the same device type,
        whatever the parallel layout.

        Weights ~ N(0, 0.02); the two projections that write into the residual stream
        (``wo``, ``w2``) use ``0.02 / sqrt(2 * n_layers)`` so the residual variance does not
        grow with depth (GPT-2); norm weights are 1. Values come from
        :func:`ringattn.model.init.normal_box_` (per-chunk generators seeded from the seed
        and the parameter name), so the global RNG is untouched and a shard can be drawn
        without the rest. Meta tensors are skipped.

        ``box_of(p) -> (local tensor, global shape, offset)`` says which box of the global
        parameter ``p`` holds here; the default (a plain tensor) is the whole of it.
        :func:`ringattn.parallel.init_local_shards` passes one for DTensor (FSDP / TP) shards.
        """
        self.tie_weights()
        box_of = box_of or _whole
        std_out = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():  # deduplicated: a tied weight comes once
            if p.is_meta:
                continue
            local, shape, offset = box_of(p)
            if name.endswith("norm.weight"):
                nn.init.ones_(local)
                continue
            std = std_out if name.endswith(("wo.weight", "w2.weight")) else 0.02
            normal_box_(local, shape, offset, seed=seed, name=name, std=std)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for ``tokens (b, s)`` long.

        Args:
            positions: long ``(s,)`` or ``(b, s)``, the global positions of these tokens
                (after a zigzag/striped shard, or restarting per packed document). Default
                ``arange(s)``.

        Returns:
            ``(b, s, vocab)`` in the parameters' dtype.
        """
        b, s = tokens.shape
        if positions is None:
            positions = torch.arange(s, device=tokens.device)
        elif positions.shape[-1] != s or positions.dim() not in (1, 2):
            raise ValueError(f"positions {tuple(positions.shape)} do not match tokens (b, {s})")
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        h = self.tok_embeddings(tokens)  # (b, s, dim)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h))

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """Training FLOPs (forward + backward) per token at sequence length ``seq_len``.

        ``6 * N_matmul + 12 * L * dim * seq_len * (1/2 if causal)``, where ``N_matmul`` counts
        the parameters used in matmuls (every projection and the output head; not the
        embedding lookup or the norms): each such parameter costs 2 FLOPs per token forward
        and 4 backward. Attention scores ``QK^T`` and ``PV`` cost ``2 * 2 * seq * dim`` per
        token and layer forward (``h * hd = dim``, whatever ``n_kv_heads``), times 3 with
        backward; a causal mask halves it. ``seq_len`` is the full (global) sequence.
        """
        cfg = self.cfg
        hd = cfg.head_dim
        attn = cfg.dim * cfg.n_heads * hd * 2 + cfg.dim * cfg.kv_heads * hd * 2
        n_matmul = cfg.n_layers * (attn + 3 * cfg.dim * cfg.hidden) + cfg.vocab_size * cfg.dim
        attn_flops = 12 * cfg.n_layers * cfg.dim * seq_len * (0.5 if causal else 1.0)
        return 6.0 * n_matmul + attn_flops
