"""Tensor parallelism (Megatron style) with ``torch.distributed.tensor.parallel``.

Per block: ``wq``, ``wk``, ``wv`` and the FFN's ``w1``, ``w3`` are column-wise parallel (each
tp rank computes its share of the heads / hidden units from the full input); ``wo`` and
``w2`` are row-wise parallel (each rank multiplies its share; the partial outputs are
summed). The attention function therefore sees ``n_heads / tp`` query heads and
``n_kv_heads / tp`` kv heads (the model reshapes with ``-1`` heads), and context
parallelism composes unchanged.

With ``sequence_parallel=True`` (Megatron-SP) the residual stream between sub-layers is
sharded along the sequence over the tp ranks as well: the norms run on ``s / tp`` tokens
(``SequenceParallel``), each sub-layer input is all-gathered along the sequence
(``PrepareModuleInput``) and each row-wise output is reduce-scattered back to a sequence
shard instead of all-reduced. Same communication volume, 1/tp of the norm and residual
activations. The embedding is then row-wise (vocabulary-sharded) and the output head
column-wise. The sequence here is the cp-local one: the layout already split the global
sequence over cp, SP splits each cp shard again over tp (in local order, which is fine:
norms, residuals and the FFN act on each token independently).

Without SP, embeddings, norms and the output head stay replicated: every tp rank computes
them on the same tokens, so their gradients are identical across tp ranks.

The blockwise FFN (``cfg.ffn_chunk``) calls ``F.linear`` on the module weights directly, so
the per-module hooks of the plan never fire for it; :func:`_tp_ffn_forward` runs it on the
local weight shards and does the input/output collectives itself.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from ringattn.ffn import SwiGLU, blockwise_ffn

__all__ = ["apply_tp", "check_tp"]


class _CopyToTP(torch.autograd.Function):
    """Identity forward; backward sums the input gradient over the tp group (Megatron "f")."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward (Megatron "g")."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def _local(w: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor weight (differentiable), or the tensor itself."""
    return w.to_local() if isinstance(w, DTensor) else w


def _tp_ffn_forward(self: SwiGLU, x: torch.Tensor) -> torch.Tensor:
    """``x (b, s, dim)``: replicated over tp (a plain tensor, or a Replicate DTensor under
    sequence parallelism) -> the same layout the plain path would return."""
    if self.chunk is None or x.shape[1] <= self.chunk:
        return SwiGLU.forward(self, x)  # the plain path calls the modules: hooks fire
    w1, w3, w2 = (_local(m.weight) for m in (self.w1, self.w3, self.w2))
    # w1, w3: (hidden / tp, dim); w2: (dim, hidden / tp) -> partial sums of the output
    if isinstance(x, DTensor):  # SP: the gradient of x is a partial sum over tp ranks
        out = blockwise_ffn(x.to_local(grad_placements=[Partial()]), w1, w3, w2, self.chunk)
        partial = DTensor.from_local(out, x.device_mesh, [Partial()])
        return partial.redistribute(placements=[Shard(1)])  # reduce-scatter on the sequence
    x = _CopyToTP.apply(x, self.tp_group)
    return _ReduceFromTP.apply(blockwise_ffn(x, w1, w3, w2, self.chunk), self.tp_group)


def check_tp(cfg, tp: int, sequence_parallel: bool = False) -> None:
    """Raise ValueError unless heads, kv heads and the FFN hidden size divide by ``tp``."""
    for name, n in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.kv_heads), ("hidden", cfg.hidden)):
        if n % tp:
            raise ValueError(
                f"tensor parallelism tp={tp} needs {name} ({n}) divisible by tp; "
                "change --parallel.tp or the model shape"
            )
    if tp > 1 and sequence_parallel and cfg.tie_embeddings:
        raise ValueError(
            "sequence parallelism shards the embedding row-wise and the output head "
            "column-wise, which a tied weight cannot be; use --model.tie_embeddings=false "
            "or --parallel.sequence_parallel=false"
        )


def _block_plan(sequence_parallel: bool) -> dict:
    if not sequence_parallel:
        return {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(),
        }
    seq = Shard(1)  # (b, s, dim): sharded along the (cp-local) sequence
    return {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(seq, None, None), desired_input_layouts=(Replicate(), None, None)
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=seq, use_local_output=False),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(
            input_layouts=(seq,), desired_input_layouts=(Replicate(),)
        ),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=seq, use_local_output=False),
    }


def _root_plan() -> dict:
    """Sequence parallel only: embedding in, final norm, output head out (logits replicated)."""
    seq = Shard(1)
    return {
        "tok_embeddings": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=seq, use_local_output=False
        ),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=seq, output_layouts=Replicate()),
    }


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> nn.Module:
    """Shard the model over the 1-D ``tp_mesh`` in place; returns ``model``.

    With ``sequence_parallel`` the cp-local sequence length must be divisible by tp.
    """
    tp = tp_mesh.size()
    check_tp(model.cfg, tp, sequence_parallel)
    if tp == 1:
        return model
    for block in model.layers:
        parallelize_module(block, tp_mesh, _block_plan(sequence_parallel))
        ffn = block.feed_forward
        ffn.tp_group = tp_mesh.get_group()
        # an instance attribute, not a wrapper module: state_dict keys stay the same
        ffn.forward = types.MethodType(_tp_ffn_forward, ffn)
    if sequence_parallel:
        parallelize_module(model, tp_mesh, _root_plan())
    return model
