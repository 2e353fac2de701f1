"""The ring simulator: schedule agreement, balance, overlap, an event-by-event oracle, speed."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from ringattn.plan.cli import simulate_main
from ringattn.plan.hardware import HARDWARE, Hardware
from ringattn.plan.simulate import BWD_FLOPS_FACTOR, LAYOUTS, simulate, to_png, work_fractions

NVLINK = HARDWARE["a100-nvlink"]
IB = HARDWARE["a100-ib"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_work_fractions_match_schedule(layout, causal, world):
    """The simulator's three fractions reproduce the per-rank FLOPs of ringattn.schedule."""
    from ringattn.schedule import attention_flops

    c = 8
    want = attention_flops(layout, world, world * c, causal)  # batch = heads = head_dim = 1
    diag, early, late = work_fractions(layout, causal, c)
    got = [4 * c * c * (diag + r * early + (world - 1 - r) * late) for r in range(world)]
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("world", [8, 64])
def test_balance_per_layout(world):
    """zigzag and striped balance causal work; contiguous's last rank does ~(2W-1)x rank 0."""
    seq = world * 8192
    res = {lay: simulate(world, seq, NVLINK, layout=lay, causal=True) for lay in LAYOUTS}
    assert res["zigzag"].imbalance == pytest.approx(1.0, abs=1e-9)
    assert res["striped"].imbalance == pytest.approx(1.0, abs=1e-3)  # differs by 1/c
    assert res["contiguous"].imbalance == pytest.approx(2 * world - 1, rel=1e-2)
    # Work is only moved around: every layout does the same total (S(S+1)/2 pairs).
    totals = [sum(r.busy_s) for r in res.values()]
    assert totals == pytest.approx([totals[0]] * 3, rel=1e-9)
    assert res["zigzag"].mfu > 1.5 * res["contiguous"].mfu


def test_compute_bound_hides_communication():
    """Big blocks on NVLink: forward fully hidden; backward only the final dK/dV hop."""
    r = simulate(8, 65536, NVLINK, layout="zigzag", causal=True, heads=32, head_dim=128)
    assert r.block_compute_s / 2 > r.block_transfer_s  # half-blocks still out-compute a hop
    assert r.fwd_exposed_s == 0.0
    assert r.bwd_exposed_s == pytest.approx(r.acc_transfer_s, rel=1e-9)
    assert r.exposed_comm_s / r.total_s < 0.02


def test_comm_bound_exposes_communication():
    """Tiny blocks over InfiniBand: the ring waits on the link most of the time."""
    world = 8
    r = simulate(world, world * 256, IB, layout="zigzag", causal=True)
    assert r.block_transfer_s > 10 * r.block_compute_s
    assert r.exposed_comm_s / r.total_s > 0.5
    assert r.fwd_s >= (world - 1) * r.block_transfer_s  # W-1 hops back to back at least


def test_free_links_leave_only_compute():
    """Infinite bandwidth, zero latency: time is the busiest rank's compute, nothing exposed."""
    hw = replace(NVLINK, link_bw=1e30, latency_s=0.0)
    for lay in LAYOUTS:
        r = simulate(8, 8 * 4096, hw, layout=lay, causal=True)
        assert r.exposed_comm_s == pytest.approx(0.0, abs=1e-12)
        assert r.total_s == pytest.approx(max(r.busy_s), rel=1e-12)


def test_single_device_mfu_is_efficiency_times_model_over_hardware_flops():
    """W=1, non-causal: MFU = eff * 3 / (1 + 2.5), the model/hardware FLOP ratio."""
    r = simulate(1, 4096, NVLINK, causal=False)
    assert r.exposed_comm_s == 0.0
    assert r.mfu == pytest.approx(NVLINK.efficiency * 3 / (1 + BWD_FLOPS_FACTOR), rel=1e-12)


def _oracle(world, fracs, t_block, x_kv, x_acc):
    """Event-by-event finish time, scalar loops, every link modelled as a FIFO resource.

    Independent of simulate(): it decides early/late from j = (r - i) % W directly and keeps
    the forward link constraint that the vectorised version proves redundant and drops.
    """

    def comp(r, i):
        j = (r - i) % world
        return t_block * (fracs[0] if i == 0 else fracs[1] if j < r else fracs[2])

    start, acc_arr, link_free = [0.0] * world, [0.0] * world, [0.0] * world  # link r-1 -> r
    for i in range(world):
        done = [start[r] + comp(r, i) for r in range(world)]
        if x_acc is not None:
            done = [max(done[r], acc_arr[r]) for r in range(world)]
        kv_arr = [0.0] * world
        if i < world - 1:
            for r in range(world):
                kv_arr[r] = max(start[r - 1], start[r], link_free[r]) + x_kv
                link_free[r] = kv_arr[r]
        if x_acc is not None:
            for r in range(world):
                acc_arr[r] = max(done[r - 1], link_free[r]) + x_acc
                link_free[r] = acc_arr[r]
        if i < world - 1:
            start = [max(done[r], kv_arr[r]) for r in range(world)]
    if x_acc is not None:
        done = [max(d, a) for d, a in zip(done, acc_arr)]
    return max(done)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("bw", [1e9, 12.5e9, 300e9, 3e12])
def test_matches_event_oracle(layout, world, bw):
    hw = Hardware("t", flops=312e12, mem_bytes=80e9, link_bw=bw, latency_s=20e-6)
    seq = world * 2048
    r = simulate(world, seq, hw, layout=layout, causal=True, heads=8, head_dim=64)
    fracs = work_fractions(layout, True, seq // world)
    x_kv = r.block_transfer_s if world > 1 else 0.0
    x_acc = r.acc_transfer_s if world > 1 else 0.0
    t_fwd = r.block_compute_s
    assert r.fwd_s == pytest.approx(_oracle(world, fracs, t_fwd, x_kv, None), rel=1e-12)
    t_bwd = BWD_FLOPS_FACTOR * t_fwd
    assert r.bwd_s == pytest.approx(_oracle(world, fracs, t_bwd, x_kv, x_acc), rel=1e-12)


def test_large_world_runs_without_timeline():
    # Speed is a benchmark's business (`ringattn simulate`); here: W = 4096 completes, keeps
    # one busy time per rank and draws no timeline unless asked.
    for lay in ("zigzag", "contiguous"):
        r = simulate(4096, 4096 * 1024, NVLINK, layout=lay, causal=True)
        assert r.timeline is None and len(r.busy_s) == 4096
        assert all(b > 0 for b in r.busy_s)
    assert "busy_s" not in r.to_dict()


def test_invalid_inputs():
    with pytest.raises(ValueError, match="zigzag"):
        simulate(4, 4 * 3, NVLINK, layout="zigzag", causal=True)
    with pytest.raises(ValueError, match="multiple"):
        simulate(4, 10, NVLINK)
    with pytest.raises(ValueError, match="layout"):
        work_fractions("diagonal", True, 8)


def test_to_dict_is_json_and_png(tmp_path):
    r = simulate(4, 4 * 1024, IB, layout="contiguous", causal=True)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["world"] == 4 and len(d["busy_s"]) == 4
    assert d["total_s"] == pytest.approx(d["fwd_s"] + d["bwd_s"])
    kinds = {(lane, tag) for _, lane, tag, *_ in r.timeline}
    lanes = {"compute": ("fwd", "bwd"), "comm": ("fwd", "bwd", "bwd-acc")}
    assert kinds == {(lane, tag) for lane, tags in lanes.items() for tag in tags}
    pytest.importorskip("matplotlib")
    to_png(r, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="timeline"):
        to_png(simulate(4, 4096, IB, record=False), str(tmp_path / "x.png"))


def test_simulate_cli_text_and_json(capsys, tmp_path):
    argv = "--world 8 --seq 65536 --layout zigzag --causal --hardware a100-nvlink".split()
    assert simulate_main(argv) == 0
    out = capsys.readouterr().out
    assert "zigzag" in out and "MFU" in out
    assert simulate_main([*argv, "--json", "--model", "llama3-8b"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["world"] == 8 and d["imbalance"] == pytest.approx(1.0)
    assert 0 < d["mfu"] < 1 and math.isfinite(d["total_s"])
    with pytest.raises(ValueError, match="zigzag"):  # ``ringattn``: one line, exit 2
        simulate_main("--world 4 --seq 100 --layout zigzag".split())
