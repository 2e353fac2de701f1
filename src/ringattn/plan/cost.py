"""Analytic cost model: minimal block size, per-device memory, max context (step time:
:mod:`ringattn.plan.step`).

All byte counts are per device. Conventions (docs/planner.md derives each formula):

* mixed precision: bf16 parameters (2 B) and gradients (2 B), fp32 master weights and two
  AdamW moments (12 B): 16 B/param, divided by the FSDP shard size ``dp * cp`` and by ``tp``;
* tensor parallelism is Megatron-style *with* sequence parallelism, so activations also
  divide by ``tp``;
* attention is memory-efficient (flash / blockwise): nothing of size ``s^2`` is stored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ringattn.model.config import ModelConfig
from ringattn.plan.hardware import HARDWARE, Hardware
from ringattn.plan.simulate import BWD_FLOPS_FACTOR

__all__ = [
    "MIN_SEQ_BLOCKS",
    "PAPER_HARDWARE",
    "STRATEGIES",
    "MemoryBreakdown",
    "attention_elems",
    "layer_activation_elems",
    "max_context",
    "memory_breakdown",
    "min_block_size",
    "min_block_size_precise",
    "min_seq_per_device",
    "paper_table",
    "vanilla_activation_bytes",
]

STRATEGIES = ("ring", "allgather", "ulysses")
CHECKPOINTING = ("none", "full")
PAPER_HARDWARE = ("a100-nvlink", "a100-ib", "tpu-v4")
MIN_SEQ_BLOCKS = 6  # the paper's minimal sequence per device, in blocks
OPT_BYTES_PER_PARAM = 12  # fp32 master + AdamW m and v
GRAD_BYTES_PER_PARAM = 2  # bf16 gradients
LOGIT_BYTES = 6  # bf16 logits kept for backward + the fp32 copy the loss makes
LSE_BYTES = 4  # fp32 softmax log-sum-exp per (token, head), saved by flash attention
MEM_RESERVE = 0.1  # allocator fragmentation, runtime context, NCCL buffers: not planned


# --- block size ---------------------------------------------------------------------------


def min_block_size(hw: Hardware) -> float:
    """The paper's rule ``c >= F / B`` (tokens), F = peak FLOP/s, B = one-way bytes/s.

    Per block and head-summed hidden size d, a host computes ``4 d c^2`` FLOPs (QK^T and PV)
    while it sends K and V, ``2 * c * d`` bf16 values = ``4 c d`` bytes. Overlap needs
    ``4 d c^2 / F >= 4 c d / B``, i.e. ``c >= F / B``: d cancels, and so do the 4s.
    """
    return hw.flops / hw.link_bw


def min_seq_per_device(hw: Hardware) -> float:
    """The paper's minimal sequence per device, ``6 c`` (its table's convention, kept as is)."""
    return MIN_SEQ_BLOCKS * min_block_size(hw)


def min_block_size_precise(
    hw: Hardware,
    *,
    n_heads: int,
    kv_heads: int | None = None,
    head_dim: int = 128,
    dtype_bytes: int = 2,
    causal: bool = False,
    backward: bool = False,
    acc_bytes: int = 4,
    use_efficiency: bool = True,
) -> float:
    """Smallest block c (tokens) whose compute hides its transfer, latency included.

    compute(c) = w * 4 c^2 d H / (F * eff), w = 1/2 for a causal balanced layout (zigzag,
    striped), times 2.5 in backward; transfer(c) = lat + 2 c d H_kv * bytes / B, with
    bytes = dtype (+ fp32 dK/dV in backward). Without latency this is the paper's rule times
    ``(H_kv / H) * (bytes / 2) * eff / w``: MHA, bf16, non-causal, eff = 1 gives ``F / B``.
    The positive root of the quadratic adds the latency term.
    """
    kv_heads = kv_heads or n_heads
    w = 0.5 if causal else 1.0
    per_elem = dtype_bytes
    if backward:
        w *= BWD_FLOPS_FACTOR
        per_elem += acc_bytes
    rate = hw.flops * (hw.efficiency if use_efficiency else 1.0)
    a = w * 4.0 * head_dim * n_heads / rate  # seconds per c^2
    b = 2.0 * head_dim * kv_heads * per_elem / hw.link_bw  # seconds per c
    return (b + math.sqrt(b * b + 4 * a * hw.latency_s)) / (2 * a)


def paper_table(names: tuple[str, ...] = PAPER_HARDWARE) -> list[dict]:
    """Rows of the paper's minimal-block-size table from the hardware presets."""
    rows = []
    for n in names:
        hw = HARDWARE[n]
        rows.append(
            {
                "hardware": n,
                "tflops": hw.flops / 1e12,
                "link_gbps": hw.link_bw / 1e9,
                "min_block": min_block_size(hw),
                "min_seq_per_device": min_seq_per_device(hw),
            }
        )
    return rows


# --- activations --------------------------------------------------------------------------


def layer_activation_elems(
    dim: float, kv_dim: float, ffn_hidden: float, *, gated: bool = True, ffn_saved: bool = True
) -> float:
    """Elements one transformer layer saves for backward, per token (no s^2 term).

    ``4 dim``: input and output of both norms; ``2 dim``: q and the attention output (input
    of wo); ``2 kv_dim``: k and v. FFN: ``3 f`` for SwiGLU (w1 x, w3 x, their product),
    ``2 f`` for a GeLU MLP (the activation's input and output). A blockwise FFN that
    recomputes its chunks (``ffn_saved=False``) saves only its input, already counted.
    A GPT layer (kv = dim, GeLU, f = 4 dim) gives 16 dim: Korthikanti et al.'s 34 sbh bytes
    without the dropout masks.
    """
    ffn = (3 if gated else 2) * ffn_hidden if ffn_saved else 0.0
    return 6 * dim + 2 * kv_dim + ffn


def vanilla_activation_bytes(
    seq: int,
    hidden: int,
    batch: int = 1,
    *,
    n_layers: int = 1,
    ffn_hidden: int | None = None,
    n_heads: int = 16,
    bytes_per_elem: int = 2,
    materialize_scores: bool = False,
) -> float:
    """Activation bytes a plain GPT-style transformer stores for backward.

    Per layer ``batch * seq * 16 * hidden`` elements (:func:`layer_activation_elems` with a
    4x GeLU MLP), plus ``2 * n_heads * seq^2 * batch`` (scores and probabilities) when
    attention is not memory-efficient. The paper's claim -- 100M tokens, hidden 1024,
    batch 1 needs over 1000 GB -- holds for *one* layer even with memory-efficient attention:
    16 * 1024 * 1e8 * 2 B = 3.3 TB. (The layer input alone is 205 GB per layer.)
    """
    f = 4 * hidden if ffn_hidden is None else ffn_hidden
    per_layer = batch * seq * layer_activation_elems(hidden, hidden, f, gated=False)
    if materialize_scores:
        per_layer += 2.0 * n_heads * batch * float(seq) ** 2
    return n_layers * per_layer * bytes_per_elem


# --- memory breakdown ---------------------------------------------------------------------


@dataclass
class MemoryBreakdown:
    """Per-device bytes by category; ``budget`` is usable device memory (0: unknown)."""

    params: float
    grads: float
    optimizer: float
    fsdp_buffers: float  # gathered params of the current and next unit + one unit's grads
    activations: float  # saved for backward across all layers
    layer_backward: float  # gradients of one layer's activations while it back-propagates
    attention: float  # the attention op's working set (strategy dependent)
    ffn: float  # blockwise FFN chunk working set
    logits: float
    budget: float = 0.0

    @property
    def total(self) -> float:
        return sum(v for k, v in asdict(self).items() if k != "budget")

    @property
    def fits(self) -> bool:
        return self.budget <= 0 or self.total <= self.budget

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        d["fits"] = self.fits
        return d


def _check_parallel(cfg: ModelConfig, cp: int, tp: int, strategy: str, checkpointing: str):
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is unknown; choose one of {STRATEGIES}")
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing {checkpointing!r}: choose one of {CHECKPOINTING}")
    if cfg.n_heads % tp:
        raise ValueError(f"n_heads ({cfg.n_heads}) must be divisible by tp ({tp})")
    if strategy == "ulysses" and (cfg.n_heads // tp) % cp:
        raise ValueError(f"ulysses needs heads per tp rank ({cfg.n_heads // tp}) % cp ({cp}) == 0")


def _local_dims(cfg: ModelConfig, tp: int) -> tuple[float, float, float]:
    """(q dim, kv dim, ffn hidden) on one tp rank; kv heads replicate when tp > kv_heads."""
    hd = cfg.head_dim
    return cfg.n_heads // tp * hd, max(cfg.kv_heads // tp, 1) * hd, cfg.hidden / tp


def _layer_params(cfg: ModelConfig) -> int:
    d, hd = cfg.dim, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2
    return attn + 3 * d * cfg.hidden + 2 * d


def attention_elems(strategy: str, batch: int, c: float, seq: int, qd: float, kvd: float):
    """Elements one rank's attention holds at once: ``c`` local tokens of ``seq``, query (and
    output) width ``qd`` = heads x head_dim, key/value width ``kvd`` = kv_heads x head_dim."""
    if strategy == "ring":
        # The paper's 6 blocks: q, k, v, out and the two incoming k, v (GQA: k, v smaller).
        return batch * c * (2 * qd + 4 * kvd)
    if strategy == "allgather":
        return batch * (c * 2 * qd + seq * 2 * kvd)  # full K and V on every rank
    # Ulysses: q, k, v, out before and after the all-to-all, same size both sides.
    return 2 * batch * c * (2 * qd + 2 * kvd)


def memory_breakdown(
    cfg: ModelConfig,
    seq: int,
    *,
    hw: Hardware | None = None,
    batch: int = 1,
    dp: int = 1,
    cp: int = 1,
    tp: int = 1,
    strategy: str = "ring",
    checkpointing: str = "full",
    dtype_bytes: int = 2,
    fsdp: bool = True,
    loss_chunk: int | None = None,
) -> MemoryBreakdown:
    """Per-device memory for global context ``seq``, ``batch`` sequences per dp rank.

    FSDP shards parameters, gradients and optimizer states over ``dp * cp`` (the cp ranks
    hold the same weights, so they join the shard group). ``loss_chunk`` bounds the logits
    to that many tokens (a blockwise loss); None keeps the whole local shard's logits.
    """
    _check_parallel(cfg, cp, tp, strategy, checkpointing)
    n = cfg.n_params()
    shard = dp * cp if fsdp else 1
    qd, kvd, f = _local_dims(cfg, tp)
    dim = cfg.dim / tp  # sequence parallel: norm inputs/outputs split too
    c = seq / cp  # local tokens per sequence
    tokens = batch * c

    ffn_saved = cfg.ffn_chunk is None  # ringattn.ffn.blockwise_ffn saves only its input
    e_layer = 4 * dim + 2 * qd + 2 * kvd + (3 * f if ffn_saved else 0)
    layer = tokens * (e_layer * dtype_bytes + LSE_BYTES * cfg.n_heads / tp)
    if checkpointing == "full":
        # Each layer keeps its input; backward recomputes one layer at a time.
        acts = cfg.n_layers * tokens * dim * dtype_bytes + layer
    else:
        acts = cfg.n_layers * layer

    unit = max(_layer_params(cfg), cfg.vocab_size * cfg.dim)  # largest FSDP unit
    return MemoryBreakdown(
        params=n * dtype_bytes / (tp * shard),
        grads=n * GRAD_BYTES_PER_PARAM / (tp * shard),
        optimizer=n * OPT_BYTES_PER_PARAM / (tp * shard),
        fsdp_buffers=3 * unit * dtype_bytes / tp if shard > 1 else 0.0,
        activations=acts,
        layer_backward=layer,
        attention=attention_elems(strategy, batch, c, seq, qd, kvd) * dtype_bytes,
        ffn=0.0 if ffn_saved else batch * min(cfg.ffn_chunk, c) * 3 * f * dtype_bytes,
        logits=batch * min(loss_chunk or c, c) * cfg.vocab_size / tp * LOGIT_BYTES,
        budget=hw.mem_bytes * (1 - MEM_RESERVE) if hw is not None else 0.0,
    )


def max_context(
    cfg: ModelConfig,
    hw: Hardware,
    *,
    cp: int = 1,
    align: int | None = None,
    **kw,
) -> int:
    """Longest global context (a multiple of ``align``, default ``2 * cp`` for zigzag) whose
    :func:`memory_breakdown` fits ``hw``; 0 if not even one aligned step fits. Keyword
    arguments are passed to :func:`memory_breakdown`."""
    align = align or 2 * cp
    fits = lambda k: memory_breakdown(cfg, k * align, hw=hw, cp=cp, **kw).fits
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):  # memory grows with seq, so double until it no longer fits
        lo, hi = hi, hi * 2
        if hi > 1 << 50:
            return lo * align
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * align
