"""Predicted time of one training step: attention from the ring simulator (or a closed form
for all-gather and Ulysses), the GEMMs at ``hw.matmul_efficiency``. Memory and block sizes:
:mod:`ringattn.plan.cost`; the formulas: docs/planner.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ringattn.mask_plan import mask_flops
from ringattn.model.config import ModelConfig
from ringattn.plan.cost import _check_parallel, _layer_params
from ringattn.plan.hardware import Hardware
from ringattn.plan.simulate import BWD_FLOPS_FACTOR, simulate

__all__ = ["StepEstimate", "attention_pairs", "predict_step"]


@dataclass
class StepEstimate:
    """Predicted time of one training step (one micro-batch) on one device, in seconds."""

    seq: int
    step_s: float
    attention_s: float  # all layers, forward + backward (+ recomputed forward)
    linear_s: float  # projections, FFN and output head
    exposed_comm_s: float  # attention communication not hidden behind compute
    model_flops: float  # per device, no recomputation
    mfu: float
    tokens_per_s: float  # global: batch * dp * seq / step_s
    attention_layer: dict  # the simulator's (or closed form's) per-layer summary

    def as_dict(self) -> dict:
        return asdict(self)


def attention_pairs(seq: int, causal: bool, cu_seqlens=None) -> float:
    """Allowed (query, key) pairs of one sequence: S(S+1)/2 causal, S^2 full, and per
    document (sum over documents of L(L+1)/2 or L^2) with ``cu_seqlens``."""
    if cu_seqlens is None:
        return seq * (seq + 1) / 2 if causal else float(seq) ** 2
    cu = [int(c) for c in cu_seqlens]
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    return float(sum(n * (n + 1) // 2 if causal else n * n for n in lens))


def _closed_form_layer(hw: Hardware, seq: int, cp: int, strategy: str, layout: str,
                       causal: bool, cu_seqlens, dims: dict) -> dict:  # fmt: skip
    """All-gather and Ulysses: communication not overlapped. Ulysses splits heads, so its
    compute is balanced; all-gather's busiest rank sets the pace (from the real mask with
    packed documents). ``dims``: batch, heads, kv_heads, head_dim on one tp rank."""
    batch, heads, kv_heads, hd = (dims[k] for k in ("batch", "heads", "kv_heads", "head_dim"))
    busiest = attention_pairs(seq, causal, cu_seqlens) / cp
    if strategy == "allgather" and cu_seqlens is not None and cp > 1:
        busiest = max(mask_flops(layout, cp, seq, causal=causal, cu_seqlens=cu_seqlens)) / 4
    fwd_c = 4.0 * batch * heads * hd * busiest / (hw.flops * hw.efficiency)
    c, lat = seq / cp, hw.latency_s * (cp - 1)
    kv_bytes = 2 * batch * c * kv_heads * hd * 2
    if strategy == "allgather":
        comm_f = lat + (cp - 1) * kv_bytes / hw.link_bw  # ring all-gather of K, V
        comm_b = comm_f + lat + (cp - 1) * 2 * kv_bytes / hw.link_bw  # re-gather + fp32 RS
    else:  # ulysses: q, k, v in and out back; dout in and dq, dk, dv back
        a2a = batch * c * (2 * heads + 2 * kv_heads) * hd * 2 * (cp - 1) / cp / hw.link_bw
        comm_f = comm_b = 2 * lat + a2a
    if cp == 1:
        comm_f = comm_b = 0.0
    fwd_s, bwd_s = fwd_c + comm_f, BWD_FLOPS_FACTOR * fwd_c + comm_b
    return {
        "model": "closed form",
        "fwd_s": fwd_s,
        "bwd_s": bwd_s,
        "fwd_exposed_s": comm_f,
        "bwd_exposed_s": comm_b,
    }


def predict_step(
    cfg: ModelConfig,
    hw: Hardware,
    seq: int,
    *,
    batch: int = 1,
    dp: int = 1,
    cp: int = 1,
    tp: int = 1,
    strategy: str = "ring",
    layout: str = "zigzag",
    causal: bool = True,
    checkpointing: str = "full",
    cu_seqlens=None,
) -> StepEstimate:
    """Step time and MFU: attention from the simulator, GEMMs at ``hw.matmul_efficiency``.

    ``cu_seqlens``: packed documents (global boundaries of one sequence); attention work,
    per rank and step, then comes from the real mask (any layout, "packed" included).

    Not modelled (assumed hidden behind compute): FSDP all-gather/reduce-scatter, dp gradient
    reduction, tp collectives, norms, RoPE, the optimizer step.
    """
    _check_parallel(cfg, cp, tp, strategy, checkpointing)
    # one layer's attention, fwd/bwd seconds and exposed communication, on one tp rank
    dims = dict(batch=batch, heads=cfg.n_heads // tp, kv_heads=max(cfg.kv_heads // tp, 1),
                head_dim=cfg.head_dim)  # fmt: skip
    if strategy == "ring":
        r = simulate(cp, seq, hw, layout=layout, causal=causal, record=False,
                     cu_seqlens=cu_seqlens, **dims)  # fmt: skip
        layer = {"model": "simulator", **r.to_dict(per_rank=False)}
    else:
        layer = _closed_form_layer(hw, seq, cp, strategy, layout, causal, cu_seqlens, dims)
    recompute = checkpointing == "full"
    n_layers = cfg.n_layers
    attention_s = n_layers * (layer["fwd_s"] * (2 if recompute else 1) + layer["bwd_s"])
    exposed = n_layers * (layer["fwd_exposed_s"] * (2 if recompute else 1) + layer["bwd_exposed_s"])

    tokens = batch * seq / cp
    layer_mm = _layer_params(cfg) - 2 * cfg.dim  # the norms are not matmuls
    head_mm = cfg.vocab_size * cfg.dim
    mm_params = (n_layers * layer_mm + head_mm) / tp
    linear_flops = 6 * tokens * mm_params  # forward 2, backward 4 FLOPs per param per token
    hw_flops = linear_flops
    if recompute:
        hw_flops += 2 * tokens * n_layers * layer_mm / tp
    if cfg.ffn_chunk is not None:  # blockwise FFN recomputes w1 x and w3 x in backward
        hw_flops += 2 * tokens * n_layers * 2 * cfg.dim * cfg.hidden / tp
    linear_s = hw_flops / (hw.flops * hw.matmul_efficiency)

    pairs = attention_pairs(seq, causal, cu_seqlens)
    attn_model = 3 * 4.0 * batch * (cfg.n_heads // tp) * cfg.head_dim * pairs / cp
    model_flops = linear_flops + n_layers * attn_model
    step_s = attention_s + linear_s
    return StepEstimate(
        seq, step_s, attention_s, linear_s, exposed, model_flops,
        mfu=model_flops / (step_s * hw.flops),
        tokens_per_s=batch * dp * seq / step_s,
        attention_layer=layer,
    )  # fmt: skip
