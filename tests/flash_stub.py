"""Stand-in ``flash_attn`` packages with the 2.6 and the 2.7+ call conventions.

They check argument names, types, shapes, dtypes and strides as the real ``mha_fwd`` /
``mha_bwd`` do (flash-attn csrc/flash_attn/flash_api.cpp), and compute with a float32
reference, so adapters can be tested on CPU (numbers) and on the meta device (shapes).

- 2.6: plain Python functions; ``window_size`` is a tuple; the forward returns
  ``(out, q, k, v, out_padded, lse, S_dmask, rng_state)``, the backward ``(dq, dk, dv, d)``.
- 2.7+: ``torch.library.custom_op``s (their Python signature reads ``(*args, **kwargs)``,
  and torch checks keyword names against the schema); the window is two ints; the forward
  returns ``(out, lse, S_dmask, rng_state)``, the backward only ``softmax_d`` and writes
  dq, dk, dv in place.
"""

from __future__ import annotations

import sys
import types
from collections import Counter

import torch

CALLS: Counter = Counter()  # "fwd" / "bwd" calls of whichever stand-in is installed
_HALF = (torch.float16, torch.bfloat16)


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise RuntimeError(f"stand-in flash_attn: {what}")


def _check_qkv(q, k, v, *, backward: bool) -> None:
    _check(q.dtype in _HALF, f"FlashAttention only support fp16 and bf16 data type, got {q.dtype}")
    _check(k.dtype == q.dtype and v.dtype == q.dtype, "query, key, value must share a dtype")
    _check(all(t.dim() == 4 for t in (q, k, v)), "q, k, v must be (batch, seqlen, heads, d)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(t.stride(-1) == 1, f"{name} must have contiguous last dimension")
    b, _, h, d = q.shape
    _check(k.shape[0] == b and k.shape[3] == d and k.shape == v.shape, "k/v shape mismatch")
    _check(h % k.shape[2] == 0, "Number of heads in key/value must divide heads in query")
    _check(d <= 256, "FlashAttention only supports head dimension at most 256")
    if backward:  # the forward pads d to a multiple of 8 itself; the raw backward does not
        _check(d % 8 == 0, "head_size should be a multiple of 8")


def _check_scalars(dropout_p, softmax_scale, causal, softcap, alibi_slopes) -> None:
    _check(isinstance(dropout_p, float) and dropout_p == 0.0, "dropout_p must be the float 0.0")
    _check(isinstance(softmax_scale, float), "softmax_scale must be a float")
    _check(isinstance(causal, bool), "causal must be a bool")
    _check(isinstance(softcap, float), "softcap must be a float")
    _check(alibi_slopes is None, "no alibi slopes expected")


def _check_backward(dout, q, k, v, out, lse, dq, dk, dv) -> None:
    _check_qkv(q, k, v, backward=True)
    for name, t in (("out", out), ("dout", dout)):
        _check(t.dtype == q.dtype, f"query and {name} must have the same dtype")
        _check(t.shape == q.shape, f"{name} must have shape {tuple(q.shape)}")
        _check(t.stride(-1) == 1, f"{name} must have contiguous last dimension")
    b, sq, h, _ = q.shape
    _check(lse.dtype == torch.float32, "softmax_lse must be fp32")
    _check(tuple(lse.shape) == (b, h, sq), f"softmax_lse must be {(b, h, sq)}, got {lse.shape}")
    _check(lse.is_contiguous(), "softmax_lse must be contiguous")
    for name, g, t in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        _check(g is not None, f"{name} must be given")
        _check(g.dtype == q.dtype and g.shape == t.shape, f"{name} must match {tuple(t.shape)}")
        _check(g.stride(-1) == 1, f"{name} must have contiguous last dimension")


def _window(left: int, right: int) -> None:
    _check(isinstance(left, int) and isinstance(right, int), "window sizes must be ints")
    _check(left == -1 and right == -1, "the adapter uses no window")


def _scores(q, k, scale, causal):
    """fp32 scores (b, h, sq, sk); causal is bottom-right aligned, as in flash-attn."""
    g = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float().repeat_interleave(g, 2)) * scale
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        i = torch.arange(sq, device=q.device).unsqueeze(1)
        j = torch.arange(sk, device=q.device).unsqueeze(0)
        s = s.masked_fill(j > i + (sk - sq), float("-inf"))
    return s


def _forward(q, k, v, scale, causal):
    s = _scores(q, k, scale, causal)
    lse = s.logsumexp(-1)  # (b, h, sq)
    g = q.shape[2] // k.shape[2]
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", p, v.float().repeat_interleave(g, 2))
    return out.to(q.dtype), lse


def _backward(dout, q, k, v, out, lse, dq, dk, dv, scale, causal) -> torch.Tensor:
    g = q.shape[2] // k.shape[2]
    p = torch.exp(_scores(q, k, scale, causal) - lse.unsqueeze(-1))  # (b, h, sq, sk)
    do, o = dout.float(), out.float()
    kf, vf = k.float().repeat_interleave(g, 2), v.float().repeat_interleave(g, 2)
    dp = torch.einsum("bqhd,bkhd->bhqk", do, vf)
    delta = (do * o).sum(-1).transpose(1, 2)  # (b, h, sq)
    ds = p * (dp - delta.unsqueeze(-1))
    b, sk, hk, d = k.shape
    fold = lambda x: x.view(b, sk, hk, g, d).sum(3)  # noqa: E731
    dq.copy_(torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale)
    dk.copy_(fold(torch.einsum("bhqk,bqhd->bkhd", ds, q.float()) * scale))
    dv.copy_(fold(torch.einsum("bhqk,bqhd->bkhd", p, do)))
    return delta


# ----------------------------------------------------------------------------- 2.6


def _fwd_26(
    q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_softmax
):
    _check_qkv(q, k, v, backward=False)
    _check_scalars(dropout_p, softmax_scale, causal, softcap, alibi_slopes)
    _check(isinstance(window_size, tuple) and len(window_size) == 2, "window_size: 2-tuple")
    _window(*window_size)
    _check(return_softmax is False, "return_softmax must be False")
    CALLS["fwd"] += 1
    out, lse = _forward(q, k, v, softmax_scale, causal)
    rng = torch.empty(2, dtype=torch.int64, device=q.device)
    return out, q, k, v, out, lse, torch.empty(0, device=q.device), rng


def _bwd_26(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
    dropout_p,
    softmax_scale,
    causal,
    window_size,
    softcap,
    alibi_slopes,
    deterministic,
    rng_state=None,
):
    _check_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv)
    _check_scalars(dropout_p, softmax_scale, causal, softcap, alibi_slopes)
    _check(isinstance(window_size, tuple) and len(window_size) == 2, "window_size: 2-tuple")
    _window(*window_size)
    _check(isinstance(deterministic, bool), "deterministic must be a bool")
    CALLS["bwd"] += 1
    d = _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
    return dq, dk, dv, d


# ----------------------------------------------------------------------------- 2.7+


def _fwd_27_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    return_softmax: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_qkv(q, k, v, backward=False)
    _check_scalars(dropout_p, softmax_scale, causal, softcap, alibi_slopes)
    _window(window_size_left, window_size_right)
    _check(return_softmax is False, "return_softmax must be False")
    CALLS["fwd"] += 1
    if q.device.type == "meta":
        b, sq, h, _ = q.shape
        out, lse = torch.empty_like(q), q.new_empty((b, h, sq), dtype=torch.float32)
    else:
        out, lse = _forward(q, k, v, softmax_scale, causal)
    rng = torch.empty(2, dtype=torch.int64, device=q.device)
    return out, lse, q.new_empty(0), rng


def _bwd_27_impl(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: torch.Tensor | None,
    dk: torch.Tensor | None,
    dv: torch.Tensor | None,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    deterministic: bool,
    rng_state: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv)
    _check_scalars(dropout_p, softmax_scale, causal, softcap, alibi_slopes)
    _window(window_size_left, window_size_right)
    _check(isinstance(deterministic, bool), "deterministic must be a bool")
    CALLS["bwd"] += 1
    if q.device.type == "meta":
        return softmax_lse.new_empty(softmax_lse.shape)
    return _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)


_OPS: dict[str, object] = {}


def _custom_ops():
    """Register the 2.7+ stand-ins once per process (custom ops cannot be redefined)."""
    if not _OPS:
        fwd = torch.library.custom_op("ringattn_stub::flash_fwd", mutates_args=())(_fwd_27_impl)
        bwd = torch.library.custom_op("ringattn_stub::flash_bwd", mutates_args=("dq", "dk", "dv"))(
            _bwd_27_impl
        )
        # the same checks, then empty outputs: what runs under FakeTensorMode
        fwd.register_fake(_fwd_27_impl)
        bwd.register_fake(_bwd_27_impl)
        _OPS.update(fwd=fwd, bwd=bwd)
    return _OPS["fwd"], _OPS["bwd"]


def make_flash_attn(version: str) -> types.ModuleType:
    """A ``flash_attn`` package object of ``version``, with ``flash_attn_interface``."""
    pkg = types.ModuleType("flash_attn")
    pkg.__version__ = version
    api = types.ModuleType("flash_attn.flash_attn_interface")
    major_minor = tuple(int(x) for x in version.split(".")[:2])
    if major_minor >= (2, 7):
        api._flash_attn_forward, api._flash_attn_backward = _custom_ops()
    else:
        api._flash_attn_forward, api._flash_attn_backward = _fwd_26, _bwd_26
    pkg.flash_attn_interface = api
    return pkg


def install(monkeypatch, version: str) -> None:
    """Install the stand-in as ``flash_attn`` and pretend this is an sm90 CUDA machine."""
    pkg = make_flash_attn(version)
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", pkg.flash_attn_interface)
    fake_cuda(monkeypatch, (9, 0))
    CALLS.clear()


def fake_cuda(monkeypatch, capability: tuple[int, int]) -> None:
    """Make the host-side CUDA probes answer as a GPU of ``capability`` would."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
