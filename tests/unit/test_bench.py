"""``ringattn bench``: dispatch, tables and plots from fake rows, the calibration and memory
arithmetic, and one small real run (``bench layouts`` on 2 gloo ranks)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ringattn.bench import calibrate, harness, layouts, memory, output, peers, rates, scaling
from ringattn.bench.cli import COMMANDS, bench_main
from ringattn.bench.harness import problem
from ringattn.bench.output import markdown_table, read_rows, write_rows
from ringattn.layouts import LAYOUTS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MACHINE = dict(cpu="test cpu", cores=2, torch="x", cuda=None, loadavg_1m=0.5)


def _png_ok(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


# --- dispatch and output --------------------------------------------------------------------


def test_bench_usage_and_unknown(capsys):
    assert bench_main([]) == 0
    out = capsys.readouterr().out
    for name in (*COMMANDS, "all"):
        assert name in out
    with pytest.raises(ValueError, match="unknown benchmark 'nope'; choose one of attention"):
        bench_main(["nope"])  # ``ringattn`` prints it as one line, exit 2


@pytest.mark.parametrize("name", ["scaling", "weak", "memory", "layouts", "peers", "calibrate"])
def test_each_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        bench_main([name, "--help"])
    assert e.value.code == 0
    assert f"ringattn bench {name}" in capsys.readouterr().out


def test_markdown_table_formats_and_missing():
    rows = [dict(a=1, b=0.12345), dict(a=2)]
    cols = [("a", "A", "{}"), ("b", "B", "{:.2f}"), ("c", "C", lambda r: f"x{r['a']}")]
    lines = markdown_table(rows, cols).splitlines()
    assert lines[0] == "| A | B | C |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| 1 | 0.12 | x1 |"
    assert lines[3] == "| 2 | - | x2 |"


def test_column_units_and_lists():
    """``:fmt/unit`` divides before formatting; a list prints its elements space-separated."""
    cols = output.columns("f=GFLOP:.1f/1e9; t=s:.3f; b=MB:.1f/1048576")
    rows = [dict(f=[1.5e9, 25e9], t=[0.25, 1.0], b=3 * 2**20), dict(f=2e9)]
    lines = markdown_table(rows, cols).splitlines()
    assert lines[0] == "| GFLOP | s | MB |"
    assert lines[2] == "| 1.5 25.0 | 0.250 1.000 | 3.0 |"
    assert lines[3] == "| 2.0 | - | - |"


def test_json_lines_append_round_trip(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    write_rows([dict(a=1)], str(path))
    write_rows([dict(a=2, b=[1.5])], str(path))
    assert read_rows(str(path)) == [dict(a=1), dict(a=2, b=[1.5])]
    write_rows([dict(a=3)], "-")  # '-' writes nothing


# --- fake measured rows -------------------------------------------------------------------


def _ring_result(world: int, seq: int, cpu_per_rank: float, layout: str = "zigzag") -> dict:
    """A row shaped like ``bench.attention.summarize``'s output."""
    r = problem(world=world, seq=seq, layout=layout)
    cpu = [cpu_per_rank * (1 + 0.1 * i) for i in range(world)]
    flops = [1e9 * (i + 1) if layout == "contiguous" else 1e9 for i in range(world)]
    return dict(
        r,
        machine=MACHINE,
        fwd_s=0.3 * cpu_per_rank,
        fwdbwd_s=cpu_per_rank * world / 2,
        fwdbwd_cpu_s=sum(cpu),
        fwdbwd_cpu_max_s=max(cpu),
        fwdbwd_cpu_per_rank=cpu,
        flops_fwdbwd_per_rank=flops,
        wait_fwdbwd_s=0.01,
        tflops_fwdbwd_per_rank=0.2,
        peak_rss_mb=400.0,
        sdpa_fwdbwd_s=cpu_per_rank * world * 0.9,
        sdpa_fwdbwd_cpu_s=cpu_per_rank * world * 0.9,
        cpu_ratio_fwdbwd=1.1,
    )


def test_strong_rows_add_one_sdpa_row_per_seq_and_speedup(tmp_path):
    res = [_ring_result(w, s, 1.0 * s / 1024 / w) for s in (1024, 2048) for w in (2, 4)]
    rows = scaling.strong_rows(res)
    assert [(r["impl"], r["world"], r["seq"]) for r in rows] == [
        ("sdpa", 1, 1024),
        ("ring", 2, 1024),
        ("ring", 4, 1024),
        ("sdpa", 1, 2048),
        ("ring", 2, 2048),
        ("ring", 4, 2048),
    ]
    ring = rows[1]
    assert ring["speedup_dedicated"] == pytest.approx(
        ring["sdpa_fwdbwd_cpu_s"] / ring["fwdbwd_cpu_max_s"]
    )
    assert "| 1024 | sdpa | 1 |" in markdown_table(rows, scaling.STRONG_COLUMNS)
    scaling.plot_strong(rows, str(tmp_path / "s.png"))
    assert _png_ok(tmp_path / "s.png")


def test_weak_rows_per_step_is_time_over_world(tmp_path):
    res = [_ring_result(w, 1024 * w, 0.1 * w) for w in (1, 2, 4)]  # time per rank ~ W
    rows = scaling.weak_rows(res)
    assert [r["local_seq"] for r in rows] == [1024] * 3
    for r in rows:
        assert r["cpu_per_step_s"] == pytest.approx(r["fwdbwd_cpu_max_s"] / r["world"])
    assert rows[0]["step_vs_first"] == 1.0
    scaling.plot_weak(rows, str(tmp_path / "w.png"))
    assert _png_ok(tmp_path / "w.png")


def test_layout_balance(tmp_path):
    assert layouts.balance([1.0, 1.0]) == dict(max_over_min=1.0, max_over_mean=1.0)
    assert layouts.balance([1.0, 3.0]) == dict(max_over_min=3.0, max_over_mean=1.5)
    assert math.isinf(layouts.balance([0.0, 1.0])["max_over_min"])
    rows = layouts.layout_rows([_ring_result(2, 512, 1.0, lay) for lay in LAYOUTS])
    assert rows[0]["flops_max_over_min"] == 2.0  # the fake contiguous row
    assert rows[1]["flops_max_over_min"] == 1.0
    assert "| zigzag | 1.0 1.0 |" in markdown_table(rows, layouts.COLUMNS)
    layouts.plot(rows, str(tmp_path / "l.png"))
    assert _png_ok(tmp_path / "l.png")


# --- calibration --------------------------------------------------------------------------


def _rates(f: float = 1e11, b: float = 1e11) -> dict:
    return dict(fwd_flops=f, bwd_flops=b)


def test_calibration_rows_and_plot(tmp_path):
    rows = [problem(world=w, seq=2048, dtype="fp32") for w in (2, 4)]
    meas = {
        w: (
            dict(fwd_s=0.1 * w, fwdbwd_s=0.4 * w, fwdbwd_cpu_max_s=0.3, wait_fwdbwd_s=0.0),
            (1e-4, 1e9),
        )
        for w in (2, 4)
    }
    rates = {w: _rates() for w in (2, 4)}
    replays = {w: dict(fwdbwd_cpu_s=0.25) for w in (2, 4)}
    out = calibrate.calibration_rows(
        rows, meas, rates, (1e-4, 1e9), n_cores=2, probes={2: 0.5, 4: 1.0}, replays=replays
    )
    assert [r["share"] for r in out] == [1.0, 0.5]
    assert [r["share_loaded"] for r in out] == [pytest.approx(0.4), 0.5]
    assert out[0]["overhead_vs_replay"] == pytest.approx(0.3 / 0.25 - 1)
    for r in out:
        assert r["err_fwdbwd"] == pytest.approx(
            (r["pred_fwdbwd_s"] - r["meas_fwdbwd_s"]) / r["meas_fwdbwd_s"]
        )
        r["machine"] = MACHINE
    assert "| 4 | 2048 |" in markdown_table(out, calibrate.COLUMNS)
    calibrate.plot(out, str(tmp_path / "c.png"))
    assert _png_ok(tmp_path / "c.png")


def test_probe_share_is_a_fraction():
    assert 0 < rates.probe_share(0.05) <= 1.0


def test_replay_rank_follows_the_schedule():
    """Contiguous causal: rank 0 computes only its diagonal, the last rank W blocks."""
    row = problem(world=4, seq=1024, layout="contiguous", heads=2, head_dim=16)
    first, last = rates.replay_rank(row, 0), rates.replay_rank(row, 3)
    assert last["fwdbwd_cpu_s"] > first["fwdbwd_cpu_s"]
    assert first["fwdbwd_cpu_s"] == pytest.approx(first["fwd_cpu_s"] + first["bwd_cpu_s"])


def test_kernel_rates_small_block():
    r = rates.kernel_rates(problem(world=1, seq=64, heads=2, head_dim=16), block=64)
    assert r["fwd_flops"] > 0 and r["bwd_flops"] > 0
    assert r["fwd_flops"] == pytest.approx(4.0 * 2 * 64 * 64 * 16 / r["fwd_s"])


# --- memory -------------------------------------------------------------------------------


def test_max_context_linear_in_world():
    # per-rank peak = 10 MB + 8 KB per local token: max context = W * (budget - 10) / 8 KB
    rows = [
        dict(kind="measure", impl="ring", world=w, seq=s, peak_total_mb=10 + 8 / 1024 * s / w)
        for w in (2, 4, 8)
        for s in (1024, 2048, 4096)
    ]
    ctx = memory.max_context_rows(rows, budget_mb=138.0)
    assert [r["max_seq"] for r in ctx] == [32768, 65536, 131072]
    assert all(r["vs_linear"] == pytest.approx(1.0) for r in ctx)


def test_planner_rows_linear_for_a_small_model():
    rows = memory.planner_rows("tiny", "a100-nvlink", [2, 4, 8], mem_mb=256)
    seqs = [r["max_seq"] for r in rows]
    assert seqs[0] > 0 and seqs == sorted(seqs)
    assert rows[-1]["vs_linear"] == pytest.approx(1.0, abs=0.05)


def test_memory_measure_call_and_plot(tmp_path):
    row = problem(world=1, seq=256, heads=2, head_dim=16, impl="ring")
    got = memory.measure_rows(0, 1, [row, dict(row, impl="sdpa")])
    for g in got:
        assert g["peak_live_mb"] > 0
        assert g["inputs_mb"] == pytest.approx(4 * 256 * 2 * 16 * 4 / 2**20)
    rows = [
        dict(memory.summarize(r, [g]), machine=MACHINE)
        for r, g in zip([row, dict(row, impl="sdpa")], got)
    ]
    assert rows[0]["blocks"] > 3  # out, dq, dk, dv at least
    ctx = memory.max_context_rows(
        rows + [dict(rows[0], seq=512, peak_total_mb=2 * rows[0]["peak_total_mb"])], 64
    )
    memory.plot(rows + ctx, str(tmp_path / "m.png"))
    assert _png_ok(tmp_path / "m.png")


# --- peers --------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_bench_oracle_matches_naive_autograd(causal):
    """The chunked float64 oracle (blocks of 8 rows of 24) equals tests/oracle.py's autograd."""
    from ringattn.bench.oracle import attention_grads
    from tests.oracle import grads

    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(2, 24, 3, 8, generator=g) for _ in range(4))
    got = attention_grads(q, k, v, do, causal=causal, block=8)
    out, _, ref_g = grads(q, k, v, do, dtype=torch.float64, causal=causal)
    for name, ref in zip(harness.GRADS, (out, *ref_g)):
        assert got[name].dtype == torch.float64
        assert (got[name] - ref).abs().max() <= 1e-12, name


def test_peer_note_rows(monkeypatch):
    """Peers that did not run: not installed (one row), or installed but not on a problem (a
    row for each): ring-attention-pytorch in bf16, or when its one bucket of scores per rank
    would not fit in half the free memory."""
    rows = [problem(world=w, seq=64, dtype=d) for w in (2, 4) for d in ("fp32", "bf16")]
    impls = ["ringattn-exact", "ring-attention-pytorch", "jax-ringattention"]
    monkeypatch.setattr(peers, "_installed", lambda i: i == "ringattn-exact")
    notes = [(n["impl"], n["status"]) for n in peers.note_rows(rows, impls, 2**40)]
    assert notes == [
        ("ring-attention-pytorch", "skipped: ring_attention_pytorch not installed"),
        ("jax-ringattention", "skipped: jax or ringattention not installed"),
    ]
    monkeypatch.setattr(peers, "_installed", lambda i: True)
    notes = peers.note_rows(rows, impls, 2**40)
    assert [(n["world"], n["dtype"]) for n in notes] == [(2, "bf16"), (4, "bf16")]
    assert all(n["impl"] == "ring-attention-pytorch" for n in notes)
    assert notes[0]["status"].startswith("unsupported in bf16: ")
    big = problem(world=2, seq=16384)  # 8 x (8 heads x 8192^2) fp32 per rank, 2 ranks: 32 GiB
    assert peers.why_not("ring-attention-pytorch", big, 2**40) is None
    assert peers.why_not("ring-attention-pytorch", big, 22 * 2**30) == (
        "skipped: needs ~32 GiB (one bucket of scores per rank)"
    )
    assert peers.why_not("ringattn-exact", big, 1) is None


def test_peer_rows_status_and_summary(tmp_path):
    row = problem(world=2, seq=64, heads=2, head_dim=8)
    naive = {f"naive_err_{n}": 1e-3 for n in harness.GRADS}
    base = dict(naive, sdpa_s=2.0, scale=dict.fromkeys(harness.GRADS, 1.0))
    ok = dict.fromkeys(harness.GRADS, 1e-3)  # = naive: ok
    impls = ["ringattn-exact", "ringattn-fast", "ring-flash-attn", "torch-cp", "torch-cp-alltoall"]
    times = dict(zip(impls, (1.0, 0.5, 2.0, 4.0, 3.0)))
    errs = {i: dict(ok, dv=0.01) if i == "ring-flash-attn" else ok for i in impls}
    res = [
        {i: dict(wall_s=times[i] - r / 10, cpu_s=1.0, errs=errs[i]) for i in impls} for r in (0, 1)
    ]
    rows = peers.impl_rows(row, base, res, impls)
    by = {r["impl"]: r for r in rows}
    assert by["ringattn-exact"]["status"] == "ok" and by["ringattn-exact"]["fwdbwd_s"] == 1.0
    assert by["ring-flash-attn"]["status"] == "WRONG dv 10x naive"  # over 2x naive
    assert by["ringattn-fast"]["vs_sdpa"] == 0.25 and by["torch-cp"]["fwdbwd_cpu_s"] == 2.0
    (s,) = peers.summary(rows)
    assert s["cp"] == 3.0  # the faster rotation
    assert s["exact_vs_cp"] == pytest.approx(1 / 3) and s["fast_vs_rfa"] == 0.25
    assert s["exact_vs_sdpa"] == 0.5
    notes = [dict(row, impl="jax-ringattention", layout="-", status="skipped: not installed")]
    all_rows = [dict(r, machine=MACHINE) for r in rows + notes]
    assert "WRONG dv 10x naive" in markdown_table(all_rows, peers.COLUMNS)
    assert "| 2 | 64 | fp32 | 1.000 | 3.000 | 0.33 |" in markdown_table([s], peers.SUMMARY)
    peers.plot(all_rows, str(tmp_path / "p.png"))
    assert _png_ok(tmp_path / "p.png")


# --- one real run ------------------------------------------------------------------------


def test_layouts_smoke_run(tmp_path, capsys):
    """2 real gloo ranks, tiny causal problem, all three layouts: rows, table and plot."""
    from ringattn.cli import main

    out, png = tmp_path / "l.jsonl", tmp_path / "l.png"
    assert (
        main(
            [
                "bench",
                "layouts",
                "--world",
                "2",
                "--seq",
                "256",
                "--out",
                str(out),
                "--png",
                str(png),
            ]
        )
        == 0
    )
    rows = {r["layout"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == set(LAYOUTS)
    assert rows["zigzag"]["flops_max_over_min"] == 1.0
    assert rows["contiguous"]["flops_max_over_min"] > 2.5  # ~2W-1 = 3 for large blocks
    assert all(len(r["fwdbwd_cpu_per_rank"]) == 2 for r in rows.values())
    assert all(r["machine"]["cores"] >= 1 for r in rows.values())
    assert "| zigzag |" in capsys.readouterr().out
    assert _png_ok(png)


def test_bench_train_smoke(tmp_path):
    """A real 2-rank run of the trainer benchmark: rows parse and the numbers are sane."""
    import json

    from ringattn.bench import train as bench_train

    out = tmp_path / "train.jsonl"
    args = ["--cp", "2", "--seq", "256", "--steps", "3", "--warmup", "1"]
    assert bench_train.main([*args, "--dir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["cp"] == 2 and row["steps_measured"] == 2
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    assert row["tflops_per_rank"] == pytest.approx(row["mfu"] * row["peak_tflops"], rel=1e-6)
    assert "| 2 | 256 |" in output.markdown_table([row], bench_train.COLUMNS)


# --- outputs unchanged: every command at a tiny size, against the recorded schema ----------


@pytest.fixture(scope="module")
def golden() -> dict:
    from tests.unit.bench_outputs import GOLDEN

    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize(
    "name",
    ["attention", "scaling", "weak", "memory", "layouts", "peers", "calibrate", "train", "packed"],
)
def test_bench_outputs_unchanged(name, golden, tmp_path):
    """JSON field names and table headers of ``ringattn bench NAME`` as recorded."""
    from tests.unit.bench_outputs import schema

    assert schema(name, tmp_path) == golden[name]


def test_check_outputs_unchanged(golden, tmp_path):
    from tests.unit.bench_outputs import check_schema

    assert check_schema(tmp_path) == golden["check"]
