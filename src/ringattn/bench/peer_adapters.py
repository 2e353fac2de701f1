"""Thin adapters that run two peers on PyTorch's CPU flash op, for ``ringattn bench peers``
(docs/benchmarks.md says what each maps and why):

- ring-flash-attn 0.1.8: a stand-in ``flash_attn`` 2.6.3 (:func:`ring_flash_attn_zigzag`).
- PyTorch native context parallel: a sharding rule and SDPA handler for the CPU op that run
  torch's own ring functions (:func:`torch_cp_cpu_rule`).

Fairness: real flash-attn computes in fp32 from bf16 inputs and returns bf16. Where the CPU has
no bf16 units (the op's bf16 backward is then ~6x slower than fp32) both adapters compute
half-precision blocks in fp32 and return the input dtype, as ringattn's CPU kernel does.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
import warnings

import torch

from ..kernels.fused import cpu_half_is_native

aten = torch.ops.aten
FLASH_VERSION = "2.6.3"  # the call convention the stand-in mimics (2.7 changed the tuples)


# --- one block on the CPU op, (b, h, s, d) in and out -----------------------------------------


def _compute(dtype: torch.dtype) -> torch.dtype:
    half = dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if half and not cpu_half_is_native() else dtype


def block_forward(q, k, v, causal: bool, scale: float | None):
    """out (b, h, sq, d) in q's dtype, lse (b, h, sq) fp32. ``causal`` is top-left aligned on
    the CPU op (flash-attn: bottom-right), so it is accepted on square blocks only."""
    if causal and q.shape[2] != k.shape[2]:
        raise NotImplementedError(f"causal block {q.shape[2]}x{k.shape[2]}: square blocks only")
    c = _compute(q.dtype)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
        q.to(c), k.to(c), v.to(c), 0.0, causal, scale=scale
    )
    return out.to(q.dtype), lse.float()


def block_backward(dout, q, k, v, out, lse, causal: bool, scale: float | None):
    """dq, dk, dv (b, h, s, d) in q's dtype; ``lse`` (b, h, sq) is the merged one (made
    contiguous: the op reads it with the strides of its own output)."""
    c = _compute(q.dtype)
    grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *(t.to(c) for t in (dout, q, k, v, out)), lse.float().contiguous(), 0.0, causal,
        scale=scale,
    )  # fmt: skip
    return tuple(g.to(q.dtype) for g in grads)


# --- ring-flash-attn: a stand-in flash_attn ---------------------------------------------------


def _unsupported(dropout_p, window_size, softcap, alibi_slopes) -> None:
    if dropout_p or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None:
        raise NotImplementedError("CPU flash_attn stand-in: no dropout, window, softcap, alibi")


def _flash_attn_forward(
    q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_softmax
):
    """flash-attn 2.6.3's signature; q (b, s, h, d), k/v (b, s, h_kv, d) ->
    (out, q, k, v, out_padded, lse (b, h, s), S_dmask, rng_state)."""
    _unsupported(dropout_p, window_size, softcap, alibi_slopes)
    out, lse = block_forward(*(t.transpose(1, 2) for t in (q, k, v)), causal, softmax_scale)
    out = out.transpose(1, 2)
    return out, q, k, v, out, lse, None, None


def _flash_attn_backward(
    dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size,
    softcap, alibi_slopes, deterministic, rng_state=None,
):  # fmt: skip
    """flash-attn 2.6.3's signature: writes dq, dk, dv (b, s, h, d) in place, returns
    (dq, dk, dv, softmax_d)."""
    _unsupported(dropout_p, window_size, softcap, alibi_slopes)
    tr = (t.transpose(1, 2) for t in (dout, q, k, v, out))
    for buf, g in zip((dq, dk, dv), block_backward(*tr, softmax_lse, causal, softmax_scale)):
        buf.copy_(g.transpose(1, 2))
    return dq, dk, dv, None


def _varlen(*args, **kwargs):
    raise NotImplementedError("CPU flash_attn stand-in: the varlen functions are not mapped")


def _stand_in() -> dict[str, types.ModuleType]:
    pkg, iface = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.flash_attn_interface")
    pkg.__version__, pkg.__path__, pkg.flash_attn_interface = FLASH_VERSION, [], iface
    fns = (_flash_attn_forward, _flash_attn_backward, _varlen, _varlen)  # what 0.1.8 imports
    for name, fn in zip(("forward", "backward", "varlen_forward", "varlen_backward"), fns):
        setattr(iface, f"_flash_attn_{name}", fn)
    return {"flash_attn": pkg, "flash_attn.flash_attn_interface": iface}


@contextlib.contextmanager
def modules_set(mods: dict[str, types.ModuleType | None]):
    """``sys.modules`` with ``mods`` set (None: absent) inside, exactly as before after."""
    saved = {n: sys.modules.get(n) for n in mods}
    try:
        for n, m in mods.items():
            sys.modules.pop(n, None) if m is None else sys.modules.__setitem__(n, m)
        yield
    finally:
        for n, m in saved.items():
            sys.modules.pop(n, None) if m is None else sys.modules.__setitem__(n, m)


def ring_flash_attn_zigzag():
    """ring-flash-attn's ``zigzag_ring_flash_attn_func`` with its flash_attn calls on the CPU op,
    or None when ring_flash_attn is not installed.

    Only its ``utils`` and ``zigzag_ring_flash_attn`` modules are loaded (under an empty package
    shell): its package ``__init__`` imports transformers for an HF adapter, which fails with
    transformers >= 5 (``is_flash_attn_greater_or_equal_2_10`` was removed) and is not needed.
    Nothing it loads stays in ``sys.modules``; the function keeps the stand-in it imported."""
    spec = importlib.util.find_spec("ring_flash_attn")
    if spec is None:
        return None
    shell = types.ModuleType("ring_flash_attn")
    shell.__path__, shell.__spec__ = list(spec.submodule_search_locations), spec
    names = ("ring_flash_attn.utils", "ring_flash_attn.zigzag_ring_flash_attn")
    with modules_set({**_stand_in(), "ring_flash_attn": shell, **dict.fromkeys(names)}):
        with warnings.catch_warnings():  # its utils use torch.jit.script, deprecated in 2.13
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(names[1]).zigzag_ring_flash_attn_func


# --- PyTorch native context parallel: a CPU rule ----------------------------------------------

_FWD = aten._scaled_dot_product_flash_attention_for_cpu.default
_BWD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
SEQ_DIM = 2  # (b, h, s, d), as torch CP hard-codes it


def _strategy(n_out: int, n_in: int, input_index: int, validate: bool = True):
    """Every output and tensor input sharded on the sequence dim (torch CP's own rule)."""

    def rule(op_schema):
        from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy
        from torch.distributed.tensor.placement_types import Shard

        mesh = op_schema.get_mesh_from_args(validate=validate)
        shards = [[Shard(SEQ_DIM)] * (n_out + n_in)]
        return expand_to_full_mesh_op_strategy(mesh, op_schema, shards, input_index=input_index)

    return rule


def _ring(op_call, mesh, *args, **kwargs):
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    n = 3 if op_call == _FWD else 6  # the tensors before (dropout_p, is_causal)
    opts = dict(zip(("dropout_p", "is_causal"), args[n:]), **kwargs)
    if opts.get("attn_mask") is not None or opts.get("dropout_p"):
        raise NotImplementedError("torch CP CPU rule: no attn_mask, no dropout")
    group, scale, causal = mesh.get_group(), opts.get("scale"), bool(opts.get("is_causal"))
    if op_call == _FWD:  # (q, k, v, dropout_p=0, is_causal=False)
        q, k, v = args[:3]
        op = lambda q, k, v, *, is_causal: block_forward(q, k, v, is_causal, scale)  # noqa: E731
        return cp._templated_ring_attention(group, SEQ_DIM, op, q, k, v, is_causal=causal)
    dout, q, k, v, out, lse = args[:6]

    def op(*, query, key, value, out, logsumexp, is_causal, grad_out):
        return block_backward(grad_out, query, key, value, out, logsumexp, is_causal, scale)

    return cp._templated_ring_attention_backward(
        group, SEQ_DIM, op, dout, "grad_out", q, k, v, out, lse, is_causal=causal
    )


def _handler(op_call, args, kwargs):
    """What torch CP's ``_sdpa_handler`` does, with the CPU ops' ring functions."""
    from torch.distributed.tensor import DTensor

    dispatcher = DTensor._op_dispatcher
    info = dispatcher.unwrap_to_op_info(op_call, args, kwargs)
    dispatcher.sharding_propagator.propagate(info)
    local = _ring(op_call, info.compute_mesh, *info.local_args, **info.local_kwargs)
    return dispatcher.wrap(local, info.output_sharding.output_spec)


@contextlib.contextmanager
def torch_cp_cpu_rule(rotate: str = "allgather"):
    """Inside: ``context_parallel`` runs SDPA on CPU DTensors, rotating K/V by ``rotate``
    ("allgather", torch's default, or "alltoall"); torch's state is restored after."""
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp
    from torch.distributed.tensor.experimental._context_parallel import _sharding_rules as sr

    saved_ops, saved_rotate = dict(cp.custom_ops), cp._cp_options.rotate_method
    with contextlib.ExitStack() as stack:
        stack.enter_context(sr._op_strategy_context(_FWD, _strategy(2, 3, 2), None))
        stack.enter_context(sr._op_strategy_context(_BWD, _strategy(3, 6, 3, False), None))
        stack.callback(setattr, cp._cp_options, "rotate_method", saved_rotate)
        stack.callback(lambda: (cp.custom_ops.clear(), cp.custom_ops.update(saved_ops)))
        cp.custom_ops.update({_FWD: _handler, _BWD: _handler})
        cp.set_rotate_method(rotate)
        yield
