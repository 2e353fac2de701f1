"""Log-sum-exp merge of partial attention results, in fp32.

Two partial results over disjoint key sets, ``(out_a, lse_a)`` and ``(out_b, lse_b)``, combine
exactly into the attention over the union of the keys:

    lse = log(exp(lse_a) + exp(lse_b))
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

written as ``out -= w_b * (out - out_b)`` with ``w_b = exp(lse_b - lse) = sigmoid(lse_b - lse_a)``
so it never forms ``exp`` of a large number. A row with no keys yet has ``lse = -inf`` and
``out = 0``; merging two such rows must stay (-inf, 0), not NaN.
"""

from __future__ import annotations

import torch


def merge_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Merge ``(out_b, lse_b)`` into the fp32 accumulators ``(out, lse)`` in place.

    out: (b, h, s, d) fp32, lse: (b, h, s) fp32 (views into the accumulators are fine);
    out_b: (b, h, s, d) any float dtype, lse_b: (b, h, s) fp32, ``-inf`` for empty rows.
    ``out_b`` is consumed: when it already has the accumulator's dtype it is overwritten.
    """
    new = torch.logaddexp(lse, lse_b)
    # exp(-inf - -inf) is NaN for rows that no block has touched yet: their weight is 0.
    w_b = torch.exp(lse_b - new).nan_to_num_(nan=0.0).unsqueeze(-1)
    # out += w_b * (out_b - out), in place: no block-sized temporaries beyond out_b itself
    delta = out_b.to(out.dtype)
    out.add_(delta.sub_(out).mul_(w_b))
    lse.copy_(new)
