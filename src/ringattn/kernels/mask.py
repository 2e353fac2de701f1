"""A general attention mask described by token positions, never by a dense s x s matrix.

Query i may attend key j when all of these hold:
- causal:   k_pos[j] <= q_pos[i]
- documents: q_doc[i] == k_doc[j]           (packed sequences, ``cu_seqlens``)
- window:   q_pos[i] - left <= k_pos[j] <= q_pos[i] + right   (``left``/``right`` = -1: unbounded)

Kernels build the boolean mask one tile at a time from slices of these 1-D tensors, so the
mask costs O(tile) memory like the rest of the blockwise computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskSpec:
    q_pos: torch.Tensor  # (sq,) long, global token positions of the queries
    k_pos: torch.Tensor  # (sk,) long, global token positions of the keys
    causal: bool = False
    q_doc: torch.Tensor | None = None  # (sq,) document id per query
    k_doc: torch.Tensor | None = None  # (sk,) document id per key
    window: tuple[int, int] | None = None  # (left, right); -1 = unbounded

    def tile(self, qs: slice, ks: slice) -> torch.Tensor:
        """Boolean (sq_tile, sk_tile), True where attention is allowed."""
        qp = self.q_pos[qs].unsqueeze(1)
        kp = self.k_pos[ks].unsqueeze(0)
        allowed = torch.ones(qp.shape[0], kp.shape[1], dtype=torch.bool, device=qp.device)
        if self.causal:
            allowed &= kp <= qp
        if self.q_doc is not None and self.k_doc is not None:
            allowed &= self.q_doc[qs].unsqueeze(1) == self.k_doc[ks].unsqueeze(0)
        if self.window is not None:
            left, right = self.window
            if left >= 0:
                allowed &= kp >= qp - left
            if right >= 0:
                allowed &= kp <= qp + right
        return allowed

    def dense(self) -> torch.Tensor:
        return self.tile(slice(None), slice(None))

    def sub(self, qs: slice, ks: slice) -> MaskSpec:
        """The same mask restricted to a query slice and a key slice."""
        return MaskSpec(
            self.q_pos[qs],
            self.k_pos[ks],
            self.causal,
            None if self.q_doc is None else self.q_doc[qs],
            None if self.k_doc is None else self.k_doc[ks],
            self.window,
        )
