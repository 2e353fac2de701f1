"""plan.fit: the models ``bench calibrate`` and ``bench memory`` fit to measurements, against
closed forms and the simulator itself."""

from __future__ import annotations

import pytest

from ringattn.bench.harness import problem
from ringattn.plan import fit
from ringattn.plan.hardware import Hardware
from ringattn.plan.simulate import simulate


def test_fit_link_recovers_latency_and_bandwidth():
    lat, bw = 2e-4, 1.5e9
    sizes = [64, 1 << 20, 4 << 20, 16 << 20]
    times = [lat + n / bw for n in sizes]
    got_lat, got_bw = fit.fit_link(sizes, times)
    assert got_lat == pytest.approx(lat, rel=1e-3)
    assert got_bw == pytest.approx(bw, rel=1e-3)


def test_rel_err_sign():
    assert fit.rel_err(0.5, 1.0) == -0.5  # optimistic model
    assert fit.rel_err(1.5, 1.0) == 0.5


def _rates(f: float = 1e11, b: float = 1e11) -> dict:
    return dict(fwd_flops=f, bwd_flops=b)


def test_predict_matches_simulate_with_equal_rates():
    """With one rate for both passes, the split prediction is the simulator's own answer."""
    row = problem(world=4, seq=2048, dtype="fp32")
    got = fit.predict(row, _rates(), latency_s=1e-4, link_bw=1e9, share=1.0, dtype_bytes=4)
    hw = Hardware("t", flops=1e11, mem_bytes=1e12, link_bw=1e9, latency_s=1e-4, efficiency=1.0)
    ref = simulate(4, 2048, hw, heads=8, head_dim=64, dtype_bytes=4, acc_bytes=4, record=False)
    assert got["fwd_s"] == pytest.approx(ref.fwd_s)
    assert got["bwd_s"] == pytest.approx(ref.bwd_s)
    assert got["busy_max_s"] == pytest.approx(max(ref.busy_s))


def test_predict_core_share_scales_compute_bound_time():
    """Compute-bound (free link): half a core doubles every time."""
    row = problem(world=4, seq=4096, dtype="fp32")
    full = fit.predict(
        row, _rates(1e11, 5e10), latency_s=0.0, link_bw=1e15, share=1.0, dtype_bytes=4
    )
    half = fit.predict(
        row, _rates(1e11, 5e10), latency_s=0.0, link_bw=1e15, share=0.5, dtype_bytes=4
    )
    for k in ("fwd_s", "bwd_s", "busy_max_s"):
        assert half[k] == pytest.approx(2 * full[k], rel=1e-6)
    # backward at half the forward rate, 2.5x the FLOPs: 5x the forward busy time
    assert full["bwd_s"] == pytest.approx(5 * full["fwd_s"], rel=1e-3)


def test_core_share():
    assert fit.core_share(2, 2) == 1.0
    assert fit.core_share(8, 2) == 0.25
    assert fit.core_share(2, 2, probe=0.99) == 1.0  # cannot see a lone other process
    # half a core for one process on 2 cores: 3 others; 2 ranks share 2 cores with them
    assert fit.core_share(2, 2, probe=0.5) == pytest.approx(2 / 5)


def test_fit_line():
    assert fit.fit_line([1.0, 2.0, 3.0], [3.0, 5.0, 7.0]) == pytest.approx((2.0, 1.0))
    assert fit.fit_line([2.0], [4.0]) == (2.0, 0.0)


def test_fit_budget_solves_on_the_step_grid():
    xs, ys = [1024.0, 2048.0, 4096.0], [10 + 0.01 * x for x in (1024, 2048, 4096)]
    a, b, x = fit.fit_budget(xs, ys, budget=50.0, step=64)
    assert (a, b) == pytest.approx((0.01, 10.0))
    assert x == 3968  # (50 - 10) / 0.01 = 4000, down to a multiple of 64
    assert fit.fit_budget(xs, ys, budget=40.96 + 10, step=1024)[2] == 4096  # exact: kept
    assert fit.fit_budget(xs, [5.0, 5.0, 5.0], budget=50.0, step=64)[2] == 0  # flat: no solve
    assert fit.fit_budget(xs, ys, budget=5.0, step=64)[2] == 0  # under the intercept
