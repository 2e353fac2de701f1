"""JAX's ringattention as a ``bench peers`` peer (:mod:`ringattn.bench.peer_jax`): its child
process on W XLA CPU devices against the float64 oracle, fp32 within 1e-4 of max |oracle|,
bf16 within 2x the error of naive bf16 attention (flash-attn's rule). Skipped without jax
and ringattention (``make test`` installs both)."""

from __future__ import annotations

import sys

import pytest
import torch

from ringattn.bench import harness as h
from ringattn.bench import peer_jax
from ringattn.bench.oracle import attention_grads

pytestmark = pytest.mark.skipif(not peer_jax.installed(), reason="jax/ringattention not installed")


@pytest.mark.parametrize(
    ("world", "dtype", "chunk"),
    [(2, "fp32", 512), (4, "fp32", 512), (2, "bf16", 512), (2, "fp32", 24)],
)
def test_jax_ring_matches_oracle(world, dtype, chunk, tmp_path):
    """64 tokens per device: one chunk per block, or (at most 24: 16, the largest divisor of
    64) four, the masked ones skipped."""
    row = h.problem(world=world, seq=64 * world, dtype=dtype, heads=2, head_dim=16)
    times = peer_jax.run(row, 1, tmp_path / "jax.pt", chunk=chunk, timeout=600)
    assert times["wall_s"] > 0 and times["cpu_s"] > 0
    got = torch.load(tmp_path / "jax.pt")
    inputs = h.make_inputs(row)
    ref = attention_grads(*inputs, causal=True)
    naive = h.sdpa_grads(row, inputs)
    for n in h.GRADS:
        assert got[n].dtype == inputs[0].dtype and got[n].shape == ref[n].shape, n
        err = float((got[n].double() - ref[n]).abs().max())
        if dtype == "fp32":
            bound = 1e-4 * float(ref[n].abs().max())
        else:
            bound = 2 * float((naive[n].double() - ref[n]).abs().max())
        assert err <= bound, (n, err, bound)


def test_module_loads_without_flax_left_behind():
    before = {m for m in sys.modules if m.split(".")[0] == "flax"}
    mod = peer_jax._module()
    assert callable(mod.ring_attention) and callable(mod.below_or_on_diag)
    assert {m for m in sys.modules if m.split(".")[0] == "flax"} == before


def test_failing_child_raises_with_its_error(tmp_path):
    row = h.problem(world=2, seq=64, heads=2, head_dim=16, dtype="fp16")  # not a jax dtype here
    with pytest.raises(RuntimeError, match="(?s)jax-ringattention failed: .*KeyError"):
        peer_jax.run(row, 1, tmp_path / "x.pt", timeout=600)


def test_a_failing_jax_run_is_a_row_not_a_lost_sweep(monkeypatch, tmp_path):
    from ringattn.bench import peers

    def fail(*a, **k):
        raise RuntimeError("jax-ringattention failed: Traceback ...\nXlaRuntimeError: OOM")

    monkeypatch.setattr(peer_jax, "run", fail)
    row = h.problem(world=2, seq=64, heads=2, head_dim=16)
    (got,) = peers.jax_rows(row, {}, 1, str(tmp_path))
    assert got["impl"] == "jax-ringattention" and got["status"] == "failed: XlaRuntimeError: OOM"
