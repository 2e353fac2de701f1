"""Context parallelism: shard the batch along the sequence, swap in a distributed attention.

The model is untouched except for its attention function (``Transformer.set_attention``).
Next-token labels are formed on the *global* sequence first; then tokens, labels and RoPE
positions are sharded with one layout permutation (``ringattn.shard`` /
``ringattn.positions``), so every token keeps its label and its global position.

Strategies: ``"ring"`` calls :func:`ringattn.ring_attention` directly; the others
(``"allgather"``, ``"ulysses"``, ``"hybrid"``) and packed documents (``cu_seqlens``) at
cp > 1 go through ``ringattn.context_parallel_attention``, resolved when first called, so
this module works whether or not that entry point is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import ringattn
from ringattn.balance import PACKED
from ringattn.kernels import check_grad_precision
from ringattn.layouts import check_divisible

__all__ = ["STRATEGIES", "CPAttention", "apply_cp", "local_doc_attention", "shard_batch"]

STRATEGIES = ("ring", "allgather", "ulysses", "hybrid")


def local_doc_attention(q, k, v, cu_seqlens: torch.Tensor, causal: bool = True):
    """One rank, whole sequence, packed documents: q ``(1, s, h, hd)``, k/v ``(1, s, h_kv,
    hd)``, ``cu_seqlens`` int ``(n_docs + 1,)``; attention never crosses a document."""
    outs = []
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (t[:, a:b].transpose(1, 2) for t in (q, k, v))  # (1, h, n, hd)
        o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, enable_gqa=True)
        outs.append(o.transpose(1, 2))
    return torch.cat(outs, dim=1)


def _family():
    fn = getattr(ringattn, "context_parallel_attention", None)
    if fn is None:
        raise RuntimeError(
            "this configuration needs ringattn.context_parallel_attention (strategies other "
            "than 'ring', or packed documents with cu_seqlens at cp > 1), which this install "
            "does not provide; use --parallel.strategy=ring, --parallel.cp=1 or "
            "--data.cross_doc_attention=true"
        )
    return fn


@dataclass
class CPAttention:
    """The model's ``attn_fn`` under context parallelism; q ``(b, s_local, h, hd)``.

    ``cu_seqlens`` is per-batch state set by the trainer before each forward: None, or one
    int32 tensor ``(n_docs + 1,)`` per batch row in global positions.
    """

    group: object = None
    cp: int = 1
    layout: str = "zigzag"
    strategy: str = "ring"
    kernel: str = "auto"
    mesh: object = None  # the 2-D ("ring", "ulysses") mesh of the hybrid strategy
    cu_seqlens: list[torch.Tensor] | None = None
    grad_precision: str = "auto"  # half backward: "exact" | "fast" | "auto" (ring_attention)

    def __call__(self, q, k, v, causal: bool = True) -> torch.Tensor:
        if self.cu_seqlens is not None and self.cp == 1:
            rows = [
                local_doc_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], cu, causal)
                for i, cu in enumerate(self.cu_seqlens)
            ]
            return torch.cat(rows, dim=0)
        if self.cu_seqlens is not None:  # one call for the batch, one cu_seqlens per row
            return self._family(q, k, v, causal, list(self.cu_seqlens))
        if self.strategy == "ring":
            return ringattn.ring_attention(
                q, k, v, causal=causal, layout=self.layout, group=self.group,
                kernel=self.kernel, grad_precision=self.grad_precision,
            )  # fmt: skip
        return self._family(q, k, v, causal, None)

    def _family(self, q, k, v, causal: bool, cu: list[torch.Tensor] | None) -> torch.Tensor:
        kw = dict(causal=causal, layout=self.layout, strategy=self.strategy, kernel=self.kernel,
                  grad_precision=self.grad_precision)  # fmt: skip
        if cu is not None:
            kw["cu_seqlens"] = cu
        if self.strategy == "hybrid":
            return _family()(q, k, v, mesh=self.mesh, **kw)
        return _family()(q, k, v, group=self.group, **kw)


def apply_cp(
    model: nn.Module,
    cp_mesh,
    *,
    layout: str = "zigzag",
    strategy: str = "ring",
    kernel: str = "auto",
    hybrid_mesh=None,
    grad_precision: str = "auto",
) -> CPAttention:
    """Give every layer of ``model`` a :class:`CPAttention` over the 1-D ``cp_mesh``
    (``strategy="hybrid"``: also the 2-D ``hybrid_mesh`` named ("ring", "ulysses"));
    returns it."""
    if strategy not in STRATEGIES:
        raise ValueError(f"parallel.strategy={strategy!r} is unknown; choose one of {STRATEGIES}")
    if strategy != "ring":
        _family()  # fail at setup, not in the first forward
    if strategy == "hybrid" and hybrid_mesh is None:
        raise ValueError(
            "parallel.strategy='hybrid' needs cp split into ring x ulysses: set "
            "--parallel.ulysses to a divisor of cp (> 1)"
        )
    check_grad_precision(grad_precision)
    attn = CPAttention(
        cp_mesh.get_group(), cp_mesh.size(), layout, strategy, kernel, hybrid_mesh,
        grad_precision=grad_precision,
    )  # fmt: skip
    model.set_attention(attn)
    return attn


def shard_batch(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    *,
    layout: str,
    cp_rank: int,
    cp: int,
    cu_seqlens: list[torch.Tensor] | None = None,
):
    """This cp rank's part of a batch whose labels are already next-token shifted.

    Args:
        tokens, labels: ``(b, s)`` long, global order.
        cu_seqlens: optional per-row ``(n_docs + 1,)``; positions then restart per document.

    Returns:
        ``tokens (b, s/cp)``, ``labels (b, s/cp)``, ``positions`` (``(s/cp,)`` or
        ``(b, s/cp)`` with documents) in the layout's local order.
    """
    s = tokens.shape[1]
    if layout == PACKED:
        return _shard_packed(tokens, labels, cp_rank=cp_rank, cp=cp, cu_seqlens=cu_seqlens)
    check_divisible(s, layout, cp)
    sh = lambda x: ringattn.shard(x, layout, rank=cp_rank, world_size=cp)
    kw = dict(rank=cp_rank, world_size=cp, device=tokens.device)
    if cu_seqlens is None:
        pos = ringattn.positions(s, layout, **kw)
    else:
        pos = torch.stack([ringattn.positions(s, layout, cu_seqlens=c, **kw) for c in cu_seqlens])
    return sh(tokens), sh(labels), pos


def _shard_packed(tokens, labels, *, cp_rank: int, cp: int, cu_seqlens):
    """Layout "packed": each row has its own documents, hence its own permutation; returns
    ``tokens``, ``labels``, ``positions``, each ``(b, s/cp)``."""
    if cu_seqlens is None:
        raise ValueError(
            "parallel.layout='packed' balances packed documents, but this batch has none "
            "(cu_seqlens): use data.kind='text' with data.cross_doc_attention=false, or "
            "parallel.layout='zigzag'"
        )
    tok, lab, pos = [], [], []
    for i, cu in enumerate(cu_seqlens):
        kw = dict(rank=cp_rank, world_size=cp, cu_seqlens=cu)
        tok.append(ringattn.shard(tokens[i : i + 1], PACKED, **kw))
        lab.append(ringattn.shard(labels[i : i + 1], PACKED, **kw))
        pos.append(ringattn.positions(tokens.shape[1], PACKED, device=tokens.device, **kw))
    return torch.cat(tok), torch.cat(lab), torch.stack(pos)
