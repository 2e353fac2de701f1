"""The float64 oracle of the benchmarks that check exactness (``bench peers``): naive attention
on the whole, unsharded problem, with its backward written out, in blocks of query rows so
that a 16K-token problem needs a few (b, h, block, s) score tensors, not (b, h, s, s).

Naive means scores, softmax and products in float64 with an explicit causal mask; it shares
no code with the kernels it checks (not the CPU flash op, not the LSE merge).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import harness as h


def attention_grads(q, k, v, dout, *, causal: bool, block: int = 512) -> dict[str, torch.Tensor]:
    """out, dq, dk, dv (b, s, h, d) float64 of softmax(q k^T / sqrt(d)) v and of its backward
    for ``dout``; q, k, v, dout (b, s, h, d), any dtype (upcast exactly). Causal: key j is
    seen by query i iff j <= i (global positions). One query block at a time:
    P = softmax(S), O = P V, dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
    dQ = dS K scale, and dK += dS^T Q scale, dV += P^T dO over the blocks."""
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"oracle: MHA only, got {q.shape[2]} query and {k.shape[2]} kv heads")
    q, k, v, do = (t.detach().to(torch.float64).transpose(1, 2) for t in (q, k, v, dout))
    s, scale = q.shape[2], q.shape[-1] ** -0.5  # q, k, v, do: (b, h, s, d)
    out, dq, dk, dv = (torch.zeros_like(q) for _ in range(4))
    for i in range(0, s, block):
        rows = slice(i, min(s, i + block))
        n = min(s, i + block) if causal else s  # keys after the block's last row are masked
        qi, doi, kj, vj = q[:, :, rows], do[:, :, rows], k[:, :, :n], v[:, :, :n]
        scores = qi @ kj.transpose(-1, -2) * scale  # (b, h, block, n)
        if causal:
            qpos = torch.arange(rows.start, rows.stop).unsqueeze(1)
            scores.masked_fill_(torch.arange(n).unsqueeze(0) > qpos, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        oi = p @ vj
        ds = p * (doi @ vj.transpose(-1, -2) - (doi * oi).sum(-1, keepdim=True))
        out[:, :, rows], dq[:, :, rows] = oi, ds @ kj * scale
        dk[:, :, :n] += ds.transpose(-1, -2) @ qi * scale
        dv[:, :, :n] += p.transpose(-1, -2) @ doi
    names = ("out", "dq", "dk", "dv")
    return {n: t.transpose(1, 2).contiguous() for n, t in zip(names, (out, dq, dk, dv))}


def reference(row: dict, path: Path, repeats: int) -> dict:
    """The oracle of ``row``'s causal problem (:func:`harness.make_inputs`) saved to ``path``
    (``file``); single-process SDPA in the input dtype with this process's threads: median
    fwd+bwd time (``sdpa_s``) and ``naive_err_<out|dq|dk|dv>``, its max |error| against the
    oracle; ``scale``: max |oracle| of each."""
    inputs = h.make_inputs(row)
    ref = attention_grads(*inputs, causal=True)
    torch.save(ref, path)
    best, median = h.timed(lambda: h.sdpa_grads(row, inputs), repeats, key="wall_s")
    naive = {f"naive_err_{n}": float((best[n].double() - ref[n]).abs().max()) for n in h.GRADS}
    scale = {n: float(ref[n].abs().max()) for n in h.GRADS}
    return dict(naive, sdpa_s=median, scale=scale, file=str(path))
