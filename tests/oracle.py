"""The independent reference: naive float64 attention with an explicit mask, written here
(not imported from ringattn) so a bug in the library cannot hide in its own oracle."""

from __future__ import annotations

import torch


def allowed_mask(q_pos, k_pos, *, causal=False, q_doc=None, k_doc=None, window=None):
    """(sq, sk) bool from global positions; mirrors the documented semantics."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    m = torch.ones(qp.shape[0], kp.shape[1], dtype=torch.bool)
    if causal:
        m &= kp <= qp
    if q_doc is not None:
        m &= q_doc[:, None] == k_doc[None, :]
    if window is not None:
        left, right = window
        if left >= 0:
            m &= kp >= qp - left
        if right >= 0:
            m &= kp <= qp + right
    return m


def naive_attention(q, k, v, *, causal=False, scale=None, mask=None, dtype=torch.float64):
    """q (b, s, h, d), k/v (b, s_k, h_kv, d) -> out (b, s, h, d), lse (b, h, s).

    Computed in ``dtype`` (float64 for the oracle; bf16/fp16 for the 'naive low-precision'
    baseline the tolerance rule compares against). ``mask`` (sq, sk) bool overrides causal.
    Fully masked rows give out = 0 and lse = -inf.
    """
    b, sq, h, d = q.shape
    hk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    qt = q.to(dtype).transpose(1, 2)
    kt = k.to(dtype).transpose(1, 2).repeat_interleave(h // hk, dim=1)
    vt = v.to(dtype).transpose(1, 2).repeat_interleave(h // hk, dim=1)
    s = (qt @ kt.transpose(-1, -2)) * scale
    if mask is None and causal:
        mask = torch.ones(sq, k.shape[1], dtype=torch.bool).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s.float() if dtype != torch.float64 else s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = (p @ vt).transpose(1, 2)
    return out, lse


def grads(q, k, v, dout, **kw):
    """out, lse and (dq, dk, dv) of naive_attention by autograd, at kw['dtype']."""
    dtype = kw.get("dtype", torch.float64)
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = naive_attention(qq, kk, vv, **kw)
    out.backward(dout.to(dtype))
    return out.detach(), lse.detach(), (qq.grad, kk.grad, vv.grad)


def rel_err(x, ref) -> float:
    """max |x - ref| / max |ref| (0-safe), both promoted to float64."""
    ref = ref.detach().double()
    x = x.detach().double()
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(x)):
        return float("inf")
    diff = (x[finite] - ref[finite]).abs().max() if finite.any() else torch.tensor(0.0)
    return float(diff / ref[finite].abs().max().clamp_min(1e-30)) if finite.any() else 0.0
