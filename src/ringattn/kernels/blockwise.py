"""Pure-torch blockwise attention with an online softmax (any device, dtype, head_dim).

Layout inside the kernels is SDPA's: q (b, h, sq, d), k and v (b, h_kv, sk, d), lse (b, h, sq)
fp32. GQA is handled by viewing q as (b, h_kv, g, sq, d) with g = h // h_kv, so K and V are
never repeated. ``causal`` is top-left aligned (query i sees keys 0..i, SDPA's convention).

Memory: the score matrix exists one (block_q x block_k) tile at a time; forward keeps
O(block_q * d) running state per query tile, backward recomputes the tile from (q, k, lse).
"""

from __future__ import annotations

import torch

from .mask import MaskSpec

DEFAULT_BLOCK = 256  # fastest tile on the 2-core CPU here (see REFERENCE.md)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    # fp32 accumulation for fp32/bf16/fp16; fp64 inputs stay fp64 (used by oracle checks).
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _tile_mask(
    causal: bool, mask: MaskSpec | None, q0: int, q1: int, k0: int, k1: int, device
) -> tuple[bool, torch.Tensor | None]:
    """(skip, allowed) for the tile rows [q0, q1) x cols [k0, k1)."""
    if mask is not None:
        allowed = mask.tile(slice(q0, q1), slice(k0, k1))
        if not bool(allowed.any()):
            return True, None
        return False, None if bool(allowed.all()) else allowed
    if causal:
        if k0 > q1 - 1:  # every key after every query: fully masked
            return True, None
        if k1 - 1 > q0:  # the diagonal crosses this tile
            qi = torch.arange(q0, q1, device=device).unsqueeze(1)
            kj = torch.arange(k0, k1, device=device).unsqueeze(0)
            return False, kj <= qi
    return False, None


def _split(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int]:
    h, hk = q.shape[1], k.shape[1]
    return hk, h // hk


def blockwise_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    mask: MaskSpec | None = None,
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns out (b, h, sq, d) and lse (b, h, sq) in the accumulation dtype (fp32; fp64
    for fp64 inputs).

    Rows with no allowed key get out = 0 and lse = -inf.
    """
    b, h, sq, d = q.shape
    hk, g = _split(q, k)
    sk, dv = k.shape[2], v.shape[3]
    acc = _acc_dtype(q)
    q5 = q.reshape(b, hk, g, sq, d)  # free view when q is contiguous in (b, h, s, d)
    out = torch.zeros(b, hk, g, sq, dv, dtype=acc, device=q.device)
    lse = torch.full((b, hk, g, sq), float("-inf"), dtype=acc, device=q.device)
    for q0 in range(0, sq, block_q):
        q1 = min(q0 + block_q, sq)
        qt = q5[:, :, :, q0:q1].to(acc) * scale  # (b, hk, g, tq, d)
        m = torch.full(qt.shape[:-1], float("-inf"), dtype=acc, device=q.device)
        den = torch.zeros_like(m)
        num = torch.zeros(*qt.shape[:-1], dv, dtype=acc, device=q.device)
        for k0 in range(0, sk, block_k):
            k1 = min(k0 + block_k, sk)
            skip, allowed = _tile_mask(causal, mask, q0, q1, k0, k1, q.device)
            if skip:
                continue
            kt = k[:, :, None, k0:k1].to(acc)  # (b, hk, 1, tk, d)
            vt = v[:, :, None, k0:k1].to(acc)
            s = qt @ kt.transpose(-1, -2)  # (b, hk, g, tq, tk)
            if allowed is not None:
                s.masked_fill_(~allowed, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            # rows still empty keep m = -inf; shift by 0 there so exp() stays finite
            shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - shift.unsqueeze(-1))
            alpha = torch.exp(m - shift)
            den = den * alpha + p.sum(-1)
            num = num * alpha.unsqueeze(-1) + p @ vt
            m = m_new
        empty = den == 0
        out[:, :, :, q0:q1] = num / torch.where(empty, torch.ones_like(den), den).unsqueeze(-1)
        lse[:, :, :, q0:q1] = torch.where(empty, m, m + torch.log(den))
    return out.reshape(b, h, sq, dv), lse.reshape(b, h, sq)


def blockwise_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    mask: MaskSpec | None = None,
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one (q-block, kv-block) pair given the FINAL out and lse of those rows.

    dS = P * (dP - rowsum(dO * O)) with P = exp(S - lse) is exact per block because lse is the
    global normaliser. Returns dq (b, h, sq, d), dk and dv (b, h_kv, sk, d) in the accumulation
    dtype (fp32, or fp64 for fp64 inputs).
    """
    b, h, sq, d = q.shape
    hk, g = _split(q, k)
    sk = k.shape[2]
    acc = _acc_dtype(q)
    q5 = q.reshape(b, hk, g, sq, d)
    do5 = dout.reshape(b, hk, g, sq, -1)
    lse5 = lse.reshape(b, hk, g, sq).to(acc)
    # D_i = rowsum(dO * O): the softmax-Jacobian correction term, (b, hk, g, sq)
    delta = (do5.to(acc) * out.reshape(b, hk, g, sq, -1).to(acc)).sum(-1)
    dq = torch.zeros(b, hk, g, sq, d, dtype=acc, device=q.device)
    dk = torch.zeros(b, hk, sk, d, dtype=acc, device=q.device)
    dvv = torch.zeros(b, hk, sk, v.shape[3], dtype=acc, device=q.device)
    for q0 in range(0, sq, block_q):
        q1 = min(q0 + block_q, sq)
        qt = q5[:, :, :, q0:q1].to(acc)
        dot = do5[:, :, :, q0:q1].to(acc)
        lt = lse5[:, :, :, q0:q1]
        # rows with no keys anywhere (lse = -inf) contribute nothing
        lt = torch.where(torch.isinf(lt), torch.full_like(lt, float("inf")), lt).unsqueeze(-1)
        dt = delta[:, :, :, q0:q1].unsqueeze(-1)
        for k0 in range(0, sk, block_k):
            k1 = min(k0 + block_k, sk)
            skip, allowed = _tile_mask(causal, mask, q0, q1, k0, k1, q.device)
            if skip:
                continue
            kt = k[:, :, None, k0:k1].to(acc)
            vt = v[:, :, None, k0:k1].to(acc)
            s = (qt @ kt.transpose(-1, -2)) * scale
            if allowed is not None:
                s.masked_fill_(~allowed, float("-inf"))
            p = torch.exp(s - lt)  # (b, hk, g, tq, tk)
            dvv[:, :, k0:k1] += (p.transpose(-1, -2) @ dot).sum(2)
            ds = p * (dot @ vt.transpose(-1, -2) - dt)
            dq[:, :, :, q0:q1] += (ds @ kt) * scale
            dk[:, :, k0:k1] += (ds.transpose(-1, -2) @ qt).sum(2) * scale
    return dq.reshape(b, h, sq, d), dk, dvv
