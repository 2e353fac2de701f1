"""grad_precision on real gloo rings: "exact" (fp32 block backward) stays within 2x the naive
bf16 error of the float64 oracle, "fast" (bf16 block gradients summed in fp32) within 3x, at
W = 2, 4, 8; the block backward runs in the dtype each mode promises."""

from __future__ import annotations

import pytest
import torch

from tests.dist.cases import ring_case
from tests.dist.common import check_against_oracle


def _spec(world, precision, *, native, seed=0):
    # 16 tokens per rank, d=32: every block pair of the zigzag ring, in bf16
    return dict(
        b=1, s=16 * world, h=4, hk=2, d=32, dtype="bf16", layout="zigzag", causal=True,
        seed=100 + 10 * world + seed, kernel="spy", grad_precision=precision,
        half_native=native,
    )  # fmt: skip


@pytest.mark.parametrize("world", [2, 4, 8])
def test_exact_and_fast_against_oracle(pools, world):
    """As on a CPU with bf16 units: exact blocks run in fp32, fast blocks in bf16."""
    for precision, factor, ran_in in (("exact", 2.0, ["float32"]), ("fast", 3.0, ["bfloat16"])):
        spec = _spec(world, precision, native=True)
        results = pools(world).run(ring_case, spec)
        check_against_oracle(spec, results, grad_factor=factor)
        for r in results:
            assert r["bwd_dtypes"] == ran_in, (precision, r["bwd_dtypes"])
            assert r["dk"].dtype == torch.bfloat16


@pytest.mark.parametrize("world", [2, 4])
def test_without_bf16_units_fast_is_exact(pools, world):
    """Where bf16 is emulated the op computes fp32 blocks in both modes: bitwise the same."""
    got = {}
    for precision in ("exact", "fast", "auto"):
        got[precision] = pools(world).run(ring_case, _spec(world, precision, native=False))
    for key in ("out", "dq", "dk", "dv"):
        for r_exact, r_fast, r_auto in zip(got["exact"], got["fast"], got["auto"]):
            assert torch.equal(r_exact[key], r_fast[key]), key
            assert torch.equal(r_exact[key], r_auto[key]), key
