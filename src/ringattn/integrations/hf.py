"""Hugging Face transformers models under context parallelism, exact.

The model code is not touched: transformers looks its attention function up by name in
``AttentionInterface`` (and its mask builder in ``AttentionMaskInterface``) on every call, so
we register one under the name ``"ringattn"`` and switch the model's
``config._attn_implementation`` to it. Each rank then runs the whole model on its ``layout``
shard of the sequence; only attention talks to the other ranks, through
:func:`ringattn.context_parallel_attention`. Everything else in a decoder-only model (RoPE,
norms, MLP, head) is per token, so it is exact on a shard as long as every token gets its
GLOBAL position and its GLOBAL next-token label (:func:`prepare_batch`).

Masks are not materialised: the mask builder returns None and the attention applies causal,
packed documents (``cu_seqlens``, global) and the sliding window (transformers'
``sliding_window=w`` means keys in ``(p - w, p]``, our ``window=(w - 1, 0)``) from positions.

Usage (every rank, after ``init_process_group``)::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    hf.enable(model, group=cp_group, layout="zigzag", strategy="ring")
    batch = hf.prepare_batch(ids, rank=cp_rank, world_size=cp, cu_seqlens=cu)
    logits = model(**batch.model_inputs()).logits
    loss = hf.cp_loss(logits, batch.labels, group=cp_group)  # global token mean
    loss.backward()  # then SUM the parameter gradients over the cp (x dp) ranks

Errors (unsupported architecture, cross-attention, dropout, softcap, a KV cache, a padding
or 4-D mask, Ulysses heads) are raised by :func:`enable` or at the top of the attention
call, from configuration that is identical on every rank, so every rank raises before any
rank enters a collective.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..cp import STRATEGIES, context_parallel_attention
from ..kernels import check_grad_precision
from ..layouts import check_layout
from .hf_data import CPBatch, cp_loss, prepare_batch

__all__ = ["NAME", "SUPPORTED", "CPBatch", "cp_loss", "disable", "enable", "prepare_batch"]

NAME = "ringattn"
# Decoder-only architectures whose attention is exactly "causal softmax(q k^T * scaling) v"
# with GQA and an optional sliding window, checked against the single-process model.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class _CP:
    """What one model's attention layers need: the same on every rank by construction."""

    attend: Callable  # context_parallel_attention bound to everything but the tensors
    previous: str | None  # the attention implementation to restore in disable()


# attention module -> its _CP; weak, so dropping the model drops the entry
_CONTEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _transformers():
    try:
        import transformers
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(
            "ringattn.integrations.hf needs transformers >= 4.53 (AttentionInterface and "
            "AttentionMaskInterface): pip install 'ringattn[hf]'"
        ) from e
    return transformers, AttentionInterface, AttentionMaskInterface


def register() -> None:
    """Register ``"ringattn"`` with transformers (idempotent; :func:`enable` calls it)."""
    _, attention, masks = _transformers()
    attention.register(NAME, ringattn_attention)
    masks.register(NAME, _no_mask)


def _world(group, mesh) -> int:
    if mesh is not None:
        return mesh.size()
    if not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    # transformers' self-attention modules all carry these (LlamaAttention, Qwen3Attention...)
    return [
        m
        for m in model.modules()
        if hasattr(m, "is_causal") and hasattr(m, "scaling") and hasattr(m, "layer_idx")
    ]


def check_model(model: nn.Module, *, strategy: str, world: int) -> None:
    """Raise ValueError when ringattn cannot serve this model's attention exactly."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    name = f"ringattn.integrations.hf.enable({type(model).__name__})"
    if cfg is None:
        raise ValueError(f"{name}: not a transformers PreTrainedModel (no .config)")
    if getattr(cfg, "is_encoder_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise ValueError(
            f"{name}: cross-attention (encoder-decoder) is not supported; context parallelism "
            "here serves decoder-only causal self-attention"
        )
    if kind not in SUPPORTED:
        raise ValueError(
            f"{name}: model_type={kind!r} is not supported; supported: {SUPPORTED} (their "
            "attention is plain causal GQA with an optional sliding window, checked exactly)"
        )
    if float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0:
        raise ValueError(
            f"{name}: config.attention_dropout={cfg.attention_dropout} > 0 is not supported "
            "(the ring's backward recomputes attention and needs it deterministic); set it to 0"
        )
    for key in ("attn_logit_softcapping", "attention_chunk_size"):
        if getattr(cfg, key, None) is not None:
            raise ValueError(f"{name}: config.{key}={getattr(cfg, key)} is not supported")
    mods = _attention_modules(model)
    if len(mods) != cfg.num_hidden_layers:
        raise ValueError(
            f"{name}: found {len(mods)} attention modules for {cfg.num_hidden_layers} layers; "
            "cannot tell which modules to serve"
        )
    if any(not m.is_causal for m in mods):
        raise ValueError(f"{name}: a non-causal attention layer is not supported")
    h = cfg.num_attention_heads
    if strategy == "ulysses" and h % world:
        raise ValueError(
            f"{name}: strategy='ulysses' splits the {h} query heads over {world} ranks, which "
            "does not divide them; use strategy='ring' or 'allgather'"
        )


def enable(
    model: nn.Module,
    *,
    group=None,
    layout: str = "zigzag",
    strategy: str = "ring",
    mesh=None,
    kernel: str = "auto",
    grad_precision: str = "auto",
) -> nn.Module:
    """Switch a transformers causal LM over to context-parallel attention; returns ``model``.

    Args:
        group: the cp process group (default: the world). For ``strategy="hybrid"`` pass
            ``mesh=`` a 2-D DeviceMesh named ("ring", "ulysses") instead.
        layout: how :func:`prepare_batch` shards the sequence ("zigzag" balances causal work).
        strategy: one of :data:`ringattn.STRATEGIES`.
        kernel: the local attention kernel ("auto", "sdpa", "blockwise", "flash_attn").
        grad_precision: half-precision backward, "auto" | "exact" | "fast" (see
            :func:`ringattn.ring_attention`).

    No communication: safe to call on each rank in any order. Sets ``config.use_cache=False``
    (a KV cache of one shard is meaningless under context parallelism).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is unknown; choose one of {STRATEGIES}")
    check_layout(layout)
    check_grad_precision(grad_precision)
    if (strategy == "hybrid") != (mesh is not None):
        raise ValueError("strategy='hybrid' takes mesh= (and no group=); the others take group=")
    check_model(model, strategy=strategy, world=_world(group, mesh))
    register()
    mods = _attention_modules(model)
    previous = model.config._attn_implementation
    if previous == NAME:  # enabled again (new group or strategy): keep what disable restores
        previous = next((_CONTEXTS[m].previous for m in mods if m in _CONTEXTS), None)
    attend = partial(context_parallel_attention, group=group, mesh=mesh, layout=layout,
                     strategy=strategy, kernel=kernel, grad_precision=grad_precision)  # fmt: skip
    ctx = _CP(attend, previous)
    for m in mods:
        _CONTEXTS[m] = ctx
    _set_implementation(model, NAME)
    model.config.use_cache = False
    return model


def disable(model: nn.Module) -> nn.Module:
    """Undo :func:`enable`: back to the previous attention implementation (default "sdpa")."""
    mods = _attention_modules(model)
    previous = next((_CONTEXTS[m].previous for m in mods if m in _CONTEXTS), None)
    for m in mods:
        _CONTEXTS.pop(m, None)
    _set_implementation(model, previous or "sdpa")
    return model


def _set_implementation(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):  # transformers >= 4.54
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def _no_mask(*args, attention_mask=None, kv_length=None, q_length=None, **kwargs):
    """The mask builder for "ringattn": masks come from positions inside the attention.

    transformers passes a user ``attention_mask`` here (2-D padding, or a 4-D mask is
    returned earlier and reaches the attention, which rejects it)."""
    if attention_mask is not None:
        raise ValueError(
            "ringattn: attention_mask is not supported under context parallelism; pack "
            "sequences and pass cu_seqlens to prepare_batch (documents never attend across "
            "boundaries), padding the last document instead of masking it"
        )
    if kv_length is not None and q_length is not None and kv_length != q_length:
        raise ValueError(
            f"ringattn: keys ({kv_length}) != queries ({q_length}): a KV cache (generation) is "
            "not supported under context parallelism; pass use_cache=False"
        )
    return None


def ringattn_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cp_cu_seqlens: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (b, h, n, d), key/value (b, h_kv, n, d), n the
    LOCAL shard length; returns (out (b, n, h, d), None). ``cp_cu_seqlens`` (n_docs + 1,)
    int32 in GLOBAL positions arrives through the model's ``**kwargs``."""
    ctx = _CONTEXTS.get(module)
    if ctx is None:
        raise ValueError(
            f"ringattn: {type(module).__name__} was not set up for context parallelism; call "
            "ringattn.integrations.hf.enable(model, group=...) instead of setting "
            "attn_implementation='ringattn' by hand"
        )
    if attention_mask is not None:
        raise ValueError(
            "ringattn: a prepared attention mask is not supported; pass cu_seqlens to "
            "prepare_batch for packed documents"
        )
    if dropout:
        raise ValueError(f"ringattn: attention dropout {dropout} > 0 is not supported")
    if softcap is not None:
        raise ValueError("ringattn: attention logit softcapping is not supported")
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"ringattn: {key.shape[2]} keys for {query.shape[2]} queries: cross-attention and "
            "KV caches are not supported under context parallelism"
        )
    window = None if sliding_window is None else (int(sliding_window) - 1, 0)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (b, n, h[_kv], d)
    out = ctx.attend(
        q, k, v, causal=True, softmax_scale=scaling, cu_seqlens=cp_cu_seqlens, window=window
    )
    return out, None
