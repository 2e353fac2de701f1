"""Ring attention: one autograd function, one loop for every layout, mask and kernel.

Each rank keeps its queries; the K/V block travels to rank+1 while the rank computes on the
block it holds (post the transfer, compute, wait). Partial results merge through the LSE in
fp32. Backward rotates K/V the same way and sends each block's dK/dV accumulator (fp32) along
with it, so after the last step every rank holds exactly the gradients of its own K/V.

Worked example, W = 2, causal zigzag, see docs/ring_attention.md.
"""

from __future__ import annotations

import torch

from .comm import Ring, world_of
from .kernels import Kernel, get_kernel, merge_
from .schedule import RingPlan, ring_plan
from .validate import QKV_FIELDS, agree, check_layout_len, check_qkv, dtype_code

_LAYOUT_CODE = {"contiguous": 0, "zigzag": 1, "striped": 2}


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # (b, s, h, d) -> (b, h, s, d) view


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulators for every input dtype, except fp64 stays fp64 (oracle checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _init_(fresh: bool, works, rows, *accs) -> bool:
    """``accs``: (accumulator (b, h, n, ...), its empty value) pairs, left uninitialised
    (``torch.empty``) when ``fresh``. True: the first work's ``rows(w)`` covers all n rows, so
    its block is copied in, bit for bit what adding or merging it into empty accumulators
    gives. Else they are filled with their empty value (0, or -inf for an lse) here."""
    if not fresh:
        return False
    first, n = (rows(works[0]) if works else None), accs[0][0].shape[2]
    if first is not None and (first.start or 0) == 0 and (first.stop is None or first.stop >= n):
        return True
    for acc, empty in accs:
        acc.fill_(empty)
    return False


def attend_(out_t, lse, q_t, k_t, v_t, works, kernel: Kernel, scale: float, fresh=False) -> None:
    """Attend queries to one K/V block for each scheduled pair and merge into (out, lse).

    out_t (b, h, n, d) and lse (b, h, n) are fp32 accumulators (views are fine); q_t, k_t,
    v_t are (b, h[_kv], s, d) views; ``works`` are BlockWork slices into them. ``fresh``: the
    accumulators are uninitialised and set by the first block (:func:`_init_`).
    """
    copy = _init_(fresh, works, lambda w: w.q, (out_t, 0.0), (lse, float("-inf")))
    for i, w in enumerate(works):
        o_b, lse_b = kernel.forward(
            q_t[:, :, w.q], k_t[:, :, w.kv], v_t[:, :, w.kv],
            causal=w.causal, scale=scale, mask=w.mask,
        )  # fmt: skip
        if i == 0 and copy:
            out_t.copy_(o_b)
            lse.copy_(lse_b)
        else:
            merge_(out_t[:, :, w.q], lse[:, :, w.q], o_b, lse_b)


def _add_(acc, rows: slice, grad, copy: bool) -> None:
    if copy:
        acc.copy_(grad)
    else:
        acc[:, :, rows] += grad


def attend_backward_(
    dq_t, dk_t, dv_t, do_t, q_t, k_t, v_t, o_t, lse, works, kernel: Kernel, scale: float,
    fresh_q=False, fresh_kv=False,
) -> None:  # fmt: skip
    """Add each scheduled pair's gradients into dq_t and dk_t/dv_t (fp32 views), using the
    FINAL out and lse of the query rows (exact per block). ``fresh_q`` / ``fresh_kv``: dq_t /
    dk_t and dv_t are uninitialised and set by the first block (:func:`_init_`)."""
    copy_q = _init_(fresh_q, works, lambda w: w.q, (dq_t, 0.0))
    copy_kv = _init_(fresh_kv, works, lambda w: w.kv, (dk_t, 0.0), (dv_t, 0.0))
    for i, w in enumerate(works):
        dq_b, dk_b, dv_b = kernel.backward(
            do_t[:, :, w.q], q_t[:, :, w.q], k_t[:, :, w.kv], v_t[:, :, w.kv],
            o_t[:, :, w.q], lse[:, :, w.q], causal=w.causal, scale=scale, mask=w.mask,
        )  # fmt: skip
        _add_(dq_t, w.q, dq_b, i == 0 and copy_q)
        _add_(dk_t, w.kv, dk_b, i == 0 and copy_kv)
        _add_(dv_t, w.kv, dv_b, i == 0 and copy_kv)


def ring_forward(q, k, v, *, scale: float, plan: RingPlan, ring: Ring, kernel: Kernel):
    """q (b, n, h, d), k/v (b, n, h_kv, d) -> out (b, n, h, d) fp32, lse (b, h, n) fp32."""
    b, n, h, _ = q.shape
    acc = acc_dtype(q.dtype)
    # set by the first step's blocks (attend_(fresh=True)): no fill, no merge with zeros
    out = torch.empty(b, n, h, v.shape[3], dtype=acc, device=q.device)
    lse = torch.empty((b, h, n), dtype=acc, device=q.device)
    kv = [k.contiguous(), v.contiguous()]
    n_steps = len(plan)
    for step, works in enumerate(plan):
        pending = None
        if step < n_steps - 1:
            pending = ring.exchange(kv, f"k/v at forward step {step}")
        attend_(
            _bhsd(out), lse, _bhsd(q), _bhsd(kv[0]), _bhsd(kv[1]), works, kernel, scale,
            fresh=step == 0,
        )  # fmt: skip
        if pending is not None:
            kv = pending.wait()
    return out, lse


def ring_backward(
    dout, q, k, v, out, lse, *, scale: float, plan: RingPlan, ring: Ring, kernel: Kernel
):
    """Gradients for q (b, n, h, d) and this rank's own k, v (b, n, h_kv, d), all fp32."""
    dq = torch.empty(q.shape, dtype=acc_dtype(q.dtype), device=q.device)  # set at step 0
    kv = [k.contiguous(), v.contiguous()]
    n_steps = len(plan)
    pending_dkv = None
    for step, works in enumerate(plan):
        pending_kv = None
        if step < n_steps - 1:
            pending_kv = ring.exchange(kv, f"k/v at backward step {step}")
        # this step's share of the held block's dK/dV, computed before waiting for the
        # accumulators of earlier ranks, so their transfer overlaps this compute
        part = None
        if works or pending_dkv is None:  # a skipped (fully masked) step allocates nothing
            part = [torch.empty(t.shape, dtype=dq.dtype, device=t.device) for t in kv]
            attend_backward_(
                _bhsd(dq), _bhsd(part[0]), _bhsd(part[1]), _bhsd(dout), _bhsd(q),
                _bhsd(kv[0]), _bhsd(kv[1]), _bhsd(out), lse, works, kernel, scale,
                fresh_q=step == 0, fresh_kv=True,
            )  # fmt: skip
        if pending_dkv is None:  # step 0: our own block, nobody else has touched it yet
            acc = part
        else:
            acc = pending_dkv.wait()
            if part is not None:
                acc[0] += part[0]
                acc[1] += part[1]
        # The accumulators follow their block to rank+1; after the last step the block held
        # here started on rank r-(T-1), so the final hop goes straight home (shift 1-T = +1
        # when the ring runs all W steps).
        shift = 1 if step < n_steps - 1 else (1 - n_steps) % max(ring.world, 1)
        pending_dkv = ring.exchange(acc, f"dk/dv at backward step {step}", shift=shift)
        if pending_kv is not None:
            kv = pending_kv.wait()
    dk, dv = pending_dkv.wait()
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, plan, ring, kernel):
        out, lse = ring_forward(q, k, v, scale=scale, plan=plan, ring=ring, kernel=kernel)
        out = out.to(q.dtype)  # the one cast to the input dtype
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, plan, ring, kernel)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        scale, plan, ring, kernel = ctx.args
        dq, dk, dv = ring_backward(
            dout, q, k, v, out, lse, scale=scale, plan=plan, ring=ring, kernel=kernel
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_pass(q, k, v, *, scale: float, plan: RingPlan, ring: Ring, kernel: Kernel):
    """One differentiable ring pass: the internal core every entry point ends in.

    ``ring_attention``, the "ring" strategy, Ulysses/hybrid (after their all-to-all) and
    ``blockwise_attention`` (a one-rank ring) all call this with inputs they have already
    validated. q (b, n, h, d), k/v (b, n, h_kv, d); ``plan`` says which blocks each of the
    T steps computes (``schedule.ring_plan`` or ``mask_plan.ring_mask_plan``), ``ring`` moves
    K/V (``Ring.local()`` for one rank). Returns out (b, n, h, d) in the input dtype and lse
    (b, h, n) fp32 (not differentiable).
    """
    return _RingAttention.apply(q, k, v, scale, plan, ring, kernel)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str = "zigzag",
    group=None,
    return_lse: bool = False,
    kernel: str | Kernel = "auto",
    grad_precision: str = "auto",
):
    """Exact attention over a sequence sharded across the ranks of ``group``.

    Args:
        q: (b, s_local, h, d) this rank's queries, in flash-attn layout.
        k, v: (b, s_local, h_kv, d), ``h % h_kv == 0``; they travel with h_kv heads.
        causal: causal mask in GLOBAL token positions (as laid out by ``layout``).
        softmax_scale: defaults to ``d ** -0.5``.
        layout: how the caller sharded the sequence: "zigzag" (default), "contiguous",
            "striped" (see :mod:`ringattn.layouts`; ``ringattn.shard`` produces each of
            them). Zigzag is the default at every entry point because it is the one right
            for causal training: every rank does the same work at every ring step (the
            contiguous layout gives the last rank 2W-1 times the first's), and without a
            mask it costs the same as the others. It needs the global length divisible by
            2W; shard with the same layout you pass here.
        group: process group of the ring (default: the world group; one process without
            torch.distributed).
        return_lse: also return lse (b, h, s_local) fp32, natural log, scale applied.
            The LSE is not differentiable.
        kernel: "auto", "blockwise", "sdpa", "flash_attn" or a :class:`Kernel`.
        grad_precision: half-precision backward: "exact" (each block's backward in fp32,
            rounded once at the end), "fast" (block gradients in the input dtype, summed in
            fp32, as flash-attn rings do) or "auto" ("fast" on CUDA, "exact" on CPU); see
            docs/precision.md for the measured errors. fp32 inputs are exact either way.

    Returns:
        out (b, s_local, h, d) in the input dtype, or (out, lse).
    """
    name = "ring_attention"
    rank, world = world_of(group)
    error = None
    try:
        check_qkv(q, k, v, name=name)
        check_layout_len(layout, q.shape[1], name=name)
        kern = get_kernel(kernel, q.device, q.dtype, grad_precision)
    except ValueError as e:
        error = e
    meta = [-1] * 8
    if error is None:
        meta = [*q.shape, k.shape[2], dtype_code(q.dtype), _LAYOUT_CODE[layout], int(causal)]
    agree(group, meta, error, name=name, fields=(*QKV_FIELDS, "layout", "causal"))
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    plan = ring_plan(layout, causal, rank, world, q.shape[1])
    out, lse = ring_pass(q, k, v, scale=scale, plan=plan, ring=Ring(group), kernel=kern)
    return (out, lse) if return_lse else out
