"""Packed documents in the simulator, the planner and ``ringattn bench packed``: the work per
rank and step comes from the real mask (mask_plan), checked against independent counts."""

from __future__ import annotations

import json

import pytest

from ringattn.balance import lognormal_pack, rank_work, tri
from ringattn.plan import step
from ringattn.plan.cli import plan_main, simulate_main
from ringattn.plan.hardware import HARDWARE
from ringattn.plan.simulate import BWD_FLOPS_FACTOR, simulate

NVLINK = HARDWARE["a100-nvlink"]


def test_one_document_per_rank_needs_no_ring():
    """Contiguous, a document on each rank: one step, no transfer, each rank a causal
    triangle; useful FLOPs are those of the W triangles, not of one causal sequence."""
    world, c = 4, 4096
    cu = tuple(range(0, world * c + 1, c))
    r = simulate(world, world * c, NVLINK, layout="contiguous", cu_seqlens=cu, heads=8)
    tri_s = tri(c) / (c * c) * r.block_compute_s
    assert r.busy_s == pytest.approx([tri_s * (1 + BWD_FLOPS_FACTOR)] * world, rel=1e-12)
    assert r.exposed_comm_s == 0.0
    assert r.total_s == pytest.approx(tri_s * (1 + BWD_FLOPS_FACTOR), rel=1e-12)
    assert r.model_flops == pytest.approx(4.0 * 8 * 128 * world * tri(c) * 3, rel=1e-12)


@pytest.mark.parametrize("layout", ["zigzag", "packed"])
def test_busy_follows_the_causal_work_of_each_rank(layout):
    """busy_r is proportional to sum over rank r's tokens of (doc position + 1), counted from
    the positions (ringattn.balance.rank_work / a direct count), not from mask_plan."""
    from ringattn.layouts import local_indices

    world, seq = 4, 8192
    cu = lognormal_pack(seq, 1, median=512)
    r = simulate(world, seq, NVLINK, layout=layout, cu_seqlens=cu, record=False)
    if layout == "packed":
        work = rank_work(cu, world)
    else:
        doc_pos = [p - a for a, b in zip(cu[:-1], cu[1:]) for p in range(a, b)]
        work = [
            sum(doc_pos[i] + 1 for i in local_indices(seq, layout, q, world).tolist())
            for q in range(world)
        ]
    ratios = [b / r.busy_s[0] for b in r.busy_s]
    assert ratios == pytest.approx([w / work[0] for w in work], rel=1e-9)
    if layout == "packed":
        assert r.imbalance < 1.05


def test_planner_uses_document_work():
    from ringattn.model.config import get_preset

    cfg = get_preset("llama-7b")
    seq = 32768
    cu = lognormal_pack(seq, 0)
    kw = dict(cp=8, strategy="ring")
    plain = step.predict_step(cfg, NVLINK, seq, layout="zigzag", **kw)
    zig = step.predict_step(cfg, NVLINK, seq, layout="zigzag", cu_seqlens=cu, **kw)
    packed = step.predict_step(cfg, NVLINK, seq, layout="packed", cu_seqlens=cu, **kw)
    pairs = sum(tri(b - a) for a, b in zip(cu[:-1], cu[1:]))
    assert step.attention_pairs(seq, True, cu) == pairs
    assert zig.model_flops == packed.model_flops < plain.model_flops
    assert packed.attention_s < zig.attention_s  # the busiest rank sets the pace
    ag = step.predict_step(
        cfg, NVLINK, seq, layout="zigzag", cu_seqlens=cu, cp=8, strategy="allgather"
    )
    agp = step.predict_step(
        cfg, NVLINK, seq, layout="packed", cu_seqlens=cu, cp=8, strategy="allgather"
    )
    assert agp.attention_s < ag.attention_s


def test_cli_docs_and_packed_layout(capsys):
    assert (
        simulate_main(
            ["--world", "4", "--seq", "8192", "--layout", "packed", "--docs", "512", "--json"]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["layout"] == "packed" and out["imbalance"] < 1.05
    with pytest.raises(ValueError, match="add --docs MEDIAN"):  # ``ringattn``: one line, exit 2
        simulate_main(["--layout", "packed"])
    args = ["--model", "llama-7b", "--devices", "8", "--seq", "32768", "--docs", "1024", "--json"]
    assert plan_main([*args, "--layout", "packed"]) == 0
    assert json.loads(capsys.readouterr().out)["docs"] > 1


def test_bench_packed_rows_and_main(tmp_path):
    from ringattn.bench import packed

    rows = packed.flops_rows([4096], [2, 4], [0], median=256)
    cu = packed.lognormal_pack(4096, 0, 256)
    pairs = sum(tri(b - a) for a, b in zip(cu[:-1], cu[1:]))
    for r in rows:
        assert sum(r["flops_per_rank"]) == pytest.approx(14 * 8 * 64 * pairs, rel=1e-12)
        assert r["saved_vs_causal"] == pytest.approx(1 - pairs / tri(4096), rel=1e-12)
        if r["layout"] == "packed":
            want = [14 * 8 * 64 * w for w in rank_work(cu, r["world"])]
            assert r["flops_per_rank"] == pytest.approx(want, rel=1e-12)
    t = packed.time_rows(1024, [2], 0, median=128, heads=1, head_dim=16, repeats=1)
    assert [r["layout"] for r in t] == list(packed.LAYOUTS)
    assert all(len(r["fwdbwd_cpu_s_per_rank"]) == 2 for r in t)
    out, png = tmp_path / "p.jsonl", tmp_path / "p.png"
    argv = ["--seq", "2048", "--world", "2", "--seeds", "1", "--time-seq", "1024"]
    argv += ["--time-world", "2", "--repeats", "1", "--out", str(out), "--png", str(png)]
    assert packed.main(argv) == 0
    kinds = [json.loads(line)["kind"] for line in out.read_text().splitlines()]
    assert kinds.count("flops") == 4 and kinds.count("time") == 4 and kinds[-1] == "speed"
    assert png.stat().st_size > 0


def test_bench_packed_real_ring_smoke():
    from ringattn.bench import packed

    rows = packed.ring_rows(512, [2], 0, median=64, heads=1, head_dim=16, repeats=1)
    assert [r["layout"] for r in rows] == list(packed.LAYOUTS)
    assert all(len(r["fwdbwd_cpu_s_per_rank"]) == 2 and r["wall_s"] > 0 for r in rows)
