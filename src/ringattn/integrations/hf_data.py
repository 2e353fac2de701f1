"""One global batch -> one cp rank's inputs, and the loss that is exact across ranks.

Labels are shifted on the GLOBAL sequence before sharding (shifting a shard would pair each
token with its neighbour in the shard, not in the text: under zigzag, rank 0's token s/2W - 1
would predict token s - s/2W). With packed documents (``cu_seqlens``) the last token of a
document predicts nothing, and positions restart at 0 at each document. Example, s = 8,
W = 2, zigzag, documents [0, 3) and [3, 8), ids t0..t7::

    global labels   t1 t2  - t4 t5 t6 t7  -      ("-" = ignore_index)
    positions        0  1  2  0  1  2  3  4
    rank 0 holds 0 1 6 7: ids t0 t1 t6 t7, labels t1 t2 t7 -, positions 0 1 3 4
    rank 1 holds 2 3 4 5: ids t2 t3 t4 t5, labels  - t4 t5 t6, positions 2 0 1 2
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..layouts import positions, shard

__all__ = ["CPBatch", "cp_loss", "prepare_batch"]


@dataclass
class CPBatch:
    """One rank's part of a global batch; n = s / world_size tokens per row."""

    input_ids: torch.Tensor  # (b, n) long
    position_ids: torch.Tensor  # (b, n) long, global positions (restarting per document)
    labels: torch.Tensor  # (b, n) long, already shifted: the target of each token here
    cu_seqlens: torch.Tensor | None  # (n_docs + 1,) int32, GLOBAL document boundaries

    def model_inputs(self) -> dict:
        """Keyword arguments for ``model(**...)``. Labels are NOT passed: transformers' own
        loss would shift them again, per shard; use :func:`cp_loss` on the logits."""
        kw = dict(input_ids=self.input_ids, position_ids=self.position_ids, use_cache=False)
        if self.cu_seqlens is not None:
            kw["cp_cu_seqlens"] = self.cu_seqlens  # reaches the attention through **kwargs
        return kw


def global_labels(
    labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None, ignore_index: int = -100
) -> torch.Tensor:
    """(b, s) -> (b, s): token t's target is labels[t + 1] within its document, else ignored."""
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None:
        ends = cu_seqlens[1:-1].to(torch.long) - 1  # last token of every document but the last
        out[:, ends] = ignore_index
    return out


def prepare_batch(
    input_ids: torch.Tensor,
    *,
    rank: int,
    world_size: int,
    layout: str = "zigzag",
    labels: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> CPBatch:
    """The part of one global batch that cp rank ``rank`` of ``world_size`` feeds the model.

    Args:
        input_ids: (b, s) the GLOBAL token ids, identical on every cp rank; s must divide
            into the layout's chunks (zigzag: 2 * world_size).
        labels: (b, s) unshifted targets (default: ``input_ids``); ``ignore_index`` entries
            (e.g. prompt tokens) are not predicted.
        cu_seqlens: (n_docs + 1,) int, packed documents shared by every row: [0, ..., s].
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got {tuple(input_ids.shape)}")
    s = input_ids.shape[1]
    if labels is None:
        labels = input_ids
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} != input_ids {tuple(input_ids.shape)}")
    cu = None
    if cu_seqlens is not None:
        cu = torch.as_tensor(cu_seqlens, dtype=torch.int32, device=input_ids.device)
        vals = cu.tolist()
        if vals[0] != 0 or vals[-1] != s or any(b <= a for a, b in zip(vals, vals[1:])):
            raise ValueError(
                f"cu_seqlens must rise strictly from 0 to the global length {s}; got {vals}"
            )
    targets = global_labels(labels, cu, ignore_index)
    where = dict(rank=rank, world_size=world_size)
    pos = positions(s, layout, cu_seqlens=cu, device=input_ids.device, **where)
    return CPBatch(
        input_ids=shard(input_ids, layout, **where),
        position_ids=pos.unsqueeze(0).expand(input_ids.shape[0], -1),
        labels=shard(targets, layout, **where),
        cu_seqlens=cu,
    )


class _SumOverRanks(torch.autograd.Function):
    """Forward: all-reduce SUM, so every rank holds the global loss. Backward: identity.

    Each rank's backward differentiates the global loss with respect to ITS OWN terms only
    (the other ranks do theirs), so the incoming gradient passes through unchanged; summing
    the parameter gradients over the ranks afterwards gives the exact global gradient.
    (An all-reduce in the backward too would count every term world_size times.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.clone()
        if dist.is_initialized():
            dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def cp_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, group=None, ignore_index: int = -100
) -> torch.Tensor:
    """Token-weighted global mean cross-entropy over every rank of ``group`` (cp, or dp x cp).

    logits (b, n, V) any float dtype (the loss is computed in fp32), labels (b, n) from
    :func:`prepare_batch`. Returns the same scalar on every rank: sum of all token losses /
    global target count (one all-reduce of the count, one of the loss). Backward gives each
    local token loss 1 / count; sum parameter gradients over ``group`` (FSDP with divide
    factor 1, see :mod:`ringattn.parallel.fsdp`) for the gradient of the global mean.
    """
    local = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index, reduction="sum"
    )
    count = (labels != ignore_index).sum()  # int64: exact at any token count
    if dist.is_initialized():
        dist.all_reduce(count, group=group)
    return _SumOverRanks.apply(local / count.clamp(min=1).to(local.dtype), group)
