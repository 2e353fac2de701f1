"""The analytic planner: the paper's table and claim, memory accounting, max context, CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ringattn.model.config import get_preset
from ringattn.plan import cost, step
from ringattn.plan.cli import plan_main
from ringattn.plan.hardware import HARDWARE, Hardware, calibrate_from, get_hardware, measure_cpu

LLAMA7B = get_preset("llama-7b")
NVLINK = HARDWARE["a100-nvlink"]


# --- the paper's numbers ------------------------------------------------------------------


PAPER_TABLE = [  # (preset, F/B computed by hand, the paper's rounded figure)
    ("a100-nvlink", 312 / 300 * 1e3, 1e3),
    ("a100-ib", 312 / 12.5 * 1e3, 25e3),
    ("tpu-v4", 275 / 268 * 1e3, 1e3),
]


@pytest.mark.parametrize("name, exact, paper", PAPER_TABLE)
def test_paper_min_block_table(name, exact, paper):
    hw = HARDWARE[name]
    assert cost.min_block_size(hw) == pytest.approx(exact, rel=1e-12)
    assert cost.min_block_size(hw) == pytest.approx(paper, rel=0.05)  # the paper's "~1K"
    assert cost.min_seq_per_device(hw) == pytest.approx(6 * exact, rel=1e-12)


def test_precise_block_size_reduces_to_paper_rule():
    """MHA, bf16, non-causal, no efficiency or latency: exactly F/B; each factor as derived."""
    hw = replace(NVLINK, latency_s=0.0)
    base = dict(n_heads=32, head_dim=128, use_efficiency=False)
    paper = cost.min_block_size(hw)
    assert cost.min_block_size_precise(hw, **base) == pytest.approx(paper, rel=1e-12)
    causal = cost.min_block_size_precise(hw, **base, causal=True)
    assert causal == pytest.approx(2 * paper, rel=1e-12)  # half the work per block
    gqa = cost.min_block_size_precise(hw, **base, kv_heads=8)
    assert gqa == pytest.approx(paper / 4, rel=1e-12)  # a quarter of the bytes
    bwd = cost.min_block_size_precise(hw, **base, backward=True)
    assert bwd == pytest.approx(paper * (2 + 4) / 2 / 2.5, rel=1e-12)  # bf16 kv + fp32 dkv
    eff = cost.min_block_size_precise(hw, n_heads=32, head_dim=128)
    assert eff == pytest.approx(paper * hw.efficiency, rel=1e-12)
    with_lat = cost.min_block_size_precise(NVLINK, **base)
    assert with_lat > paper


def test_vanilla_100m_tokens_needs_over_1000_gb():
    b = cost.vanilla_activation_bytes(100_000_000, 1024, batch=1)
    assert b > 1000e9
    assert b == pytest.approx(16 * 1024 * 1e8 * 2, rel=1e-12)  # one layer, 16 h-wide tensors
    assert cost.layer_activation_elems(1024, 1024, 4096, gated=False) == 16 * 1024
    naive = cost.vanilla_activation_bytes(8192, 1024, materialize_scores=True)
    assert naive > 10 * cost.vanilla_activation_bytes(8192, 1024)  # the s^2 term dominates


# --- memory -------------------------------------------------------------------------------


def _states(m: cost.MemoryBreakdown) -> float:
    return m.params + m.grads + m.optimizer


def test_states_are_16_bytes_per_param_sharded_over_dp_cp():
    n = LLAMA7B.n_params()
    for dp, cp, tp in [(1, 1, 1), (2, 4, 1), (4, 2, 1), (1, 8, 2)]:
        m = cost.memory_breakdown(LLAMA7B, 8 * 4096, dp=dp, cp=cp, tp=tp)
        assert _states(m) * dp * cp * tp == pytest.approx(16 * n, rel=1e-12)
    no_fsdp = cost.memory_breakdown(LLAMA7B, 8 * 4096, dp=2, cp=4, fsdp=False)
    assert _states(no_fsdp) == pytest.approx(16 * n, rel=1e-12)


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
@pytest.mark.parametrize("ckpt", ["none", "full"])
def test_activation_memory_scales_as_one_over_cp(strategy, ckpt):
    seq = 1 << 20
    m8, m16 = (
        cost.memory_breakdown(LLAMA7B, seq, cp=cp, strategy=strategy, checkpointing=ckpt)
        for cp in (8, 16)
    )
    for k in ("activations", "layer_backward", "attention", "logits"):
        assert getattr(m8, k) / getattr(m16, k) == pytest.approx(2.0, rel=1e-12)
    assert m8.total > m16.total


def test_allgather_keeps_full_kv_and_checkpointing_saves_memory():
    seq = 1 << 20
    ring, ag = (
        cost.memory_breakdown(LLAMA7B, seq, cp=32, strategy=s) for s in ("ring", "allgather")
    )
    assert ag.attention > 5 * ring.attention  # K, V of the whole sequence on every rank
    none, full = (
        cost.memory_breakdown(LLAMA7B, seq, cp=32, checkpointing=c) for c in ("none", "full")
    )
    assert full.activations < none.activations / 5
    blockwise = cost.memory_breakdown(
        LLAMA7B.with_(ffn_chunk=2048), seq, cp=32, checkpointing="none"
    )
    assert blockwise.activations < none.activations and blockwise.ffn > 0
    chunked = cost.memory_breakdown(LLAMA7B, seq, cp=32, loss_chunk=4096)
    assert chunked.logits == pytest.approx(full.logits * 4096 / (seq / 32))
    with pytest.raises(ValueError, match="ulysses"):
        cost.memory_breakdown(LLAMA7B, seq, cp=64, strategy="ulysses")  # 32 heads


def test_max_context_is_tight_and_grows_linearly_with_devices():
    kw = dict(checkpointing="full")
    mc = {cp: cost.max_context(LLAMA7B, NVLINK, cp=cp, **kw) for cp in (8, 16, 32)}
    for cp, s in mc.items():
        assert cost.memory_breakdown(LLAMA7B, s, hw=NVLINK, cp=cp, **kw).fits
        assert not cost.memory_breakdown(LLAMA7B, s + 2 * cp, hw=NVLINK, cp=cp, **kw).fits
    # Per-device activations are constant; FSDP also shrinks the states, so slightly > 2x.
    assert 2.0 <= mc[16] / mc[8] <= 2.3 and 2.0 <= mc[32] / mc[16] <= 2.3
    # Without FSDP (tp=4 so the replicated states fit) per-device context is constant.
    flat = {cp: cost.max_context(LLAMA7B, NVLINK, cp=cp, tp=4, fsdp=False, **kw) for cp in (8, 16)}
    assert flat[8] > 0
    assert flat[16] / flat[8] == pytest.approx(2.0, rel=0.01)
    ag = {cp: cost.max_context(LLAMA7B, NVLINK, cp=cp, strategy="allgather") for cp in (8, 32)}
    assert ag[32] / ag[8] < 0.9 * mc[32] / mc[8]  # the gathered K, V do not shrink with cp
    assert cost.max_context(LLAMA7B, NVLINK, cp=1) == 0  # 7B states alone exceed 80 GB


def test_predict_step():
    seq = 8 * 8192
    e = step.predict_step(LLAMA7B, NVLINK, seq, cp=8, checkpointing="full")
    assert e.step_s == pytest.approx(e.attention_s + e.linear_s)
    assert 0.2 < e.mfu < NVLINK.matmul_efficiency
    assert e.tokens_per_s == pytest.approx(seq / e.step_s)
    assert e.exposed_comm_s < 0.05 * e.step_s  # compute bound on NVLink
    none = step.predict_step(LLAMA7B, NVLINK, seq, cp=8, checkpointing="none")
    assert none.step_s < e.step_s and none.model_flops == pytest.approx(e.model_flops)
    ib = step.predict_step(LLAMA7B, HARDWARE["a100-ib"], seq, cp=8)
    assert ib.exposed_comm_s > e.exposed_comm_s
    for s in ("allgather", "ulysses"):
        other = step.predict_step(LLAMA7B, NVLINK, seq, cp=8, strategy=s)
        assert other.exposed_comm_s > 0 and 0 < other.mfu < 1


# --- hardware -----------------------------------------------------------------------------


def test_hardware_presets_and_overrides():
    assert HARDWARE["h100"].link_bw == 450e9 and HARDWARE["h200"].mem_bytes == 141e9
    hw = get_hardware("a100-ib", link_bw=25e9, mem_bytes=40e9)
    assert (hw.link_bw, hw.mem_bytes, hw.flops) == (25e9, 40e9, 312e12)
    with pytest.raises(ValueError, match="unknown"):
        get_hardware("a200")
    with pytest.raises(ValueError, match="efficiency"):
        Hardware("x", 1e12, 1e9, 1e9, efficiency=1.5)


def test_measure_cpu_overrides_skip_measuring(monkeypatch):
    # Given every value, nothing is measured: the probes must not even be called.
    from ringattn.plan import hardware

    def boom(*_a, **_k):
        raise AssertionError("measured although the value was given")

    for probe in ("_matmul_flops", "_attention_flops", "_loopback_link", "_phys_mem"):
        monkeypatch.setattr(hardware, probe, boom)
    hw = measure_cpu(flops=1e12, efficiency=0.5, link_bw=1e9, latency_s=1e-4, mem_bytes=8e9)
    assert (hw.flops, hw.link_bw, hw.mem_bytes, hw.efficiency) == (1e12, 1e9, 8e9, 0.5)


def test_measure_cpu_real_run_gives_sane_rates():
    # No wall-clock assertion (timing belongs in benchmarks); only that the numbers are sane.
    hw = measure_cpu(budget_s=0.6)
    assert hw.flops > 1e9 and hw.link_bw > 1e7 and 0 < hw.efficiency <= 1


@pytest.mark.parametrize("native", [True, False])
def test_bf16_probe_only_on_cpus_with_bf16_units(monkeypatch, native):
    # Without bf16 units a 1024^3 bf16 GEMM is emulated (~7 s on an AVX2 EPYC): never probed.
    import torch

    from ringattn.kernels import fused
    from ringattn.plan import hardware

    monkeypatch.setattr(fused, "cpu_half_is_native", lambda: native)
    want = (torch.float32, torch.bfloat16) if native else (torch.float32,)
    assert hardware._probe_dtypes() == want


def test_calibrate_from():
    hw = calibrate_from(
        {"attn_flops": 0.5e12, "matmul_flops": 2e12, "link_bw": 1.5e9, "latency_s": 2e-3},
        base="a100-nvlink",
    )
    assert hw.efficiency == pytest.approx(0.5 / 312)
    assert hw.matmul_efficiency == pytest.approx(2 / 312)
    assert (hw.link_bw, hw.latency_s) == (1.5e9, 2e-3)
    cpu = calibrate_from({"flops": 2e12, "attn_flops": 0.5e12, "link_bw": 1e9, "latency_s": 1e-4})
    assert cpu.name == "cpu" and cpu.efficiency == pytest.approx(0.25)
    with pytest.raises(ValueError, match="unknown keys"):
        calibrate_from({"tflops": 1.0}, base="h100")


# --- CLI ----------------------------------------------------------------------------------


def test_plan_paper_table(capsys):
    assert plan_main(["--paper-table"]) == 0
    out = capsys.readouterr().out
    assert "1,040" in out and "24,960" in out and "1,026" in out
    assert plan_main(["--paper-table", "--json"]) == 0
    rows = {r["hardware"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["a100-ib"]["min_block"] == pytest.approx(24960)


def test_plan_human_and_json(capsys):
    argv = "--model llama-7b --hardware a100-nvlink --devices 8 --cp 8 --checkpointing full"
    assert plan_main(argv.split()) == 0
    out = capsys.readouterr().out
    for word in ("min block", "min seq/device", "max context", "optimizer", "MFU"):
        assert word in out
    assert plan_main([*argv.split(), "--seq", "65536", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["seq"] == 65536 and p["memory"]["fits"] and 0 < p["step"]["mfu"] < 1
    assert p["min_block_paper"] == pytest.approx(1040)
    with pytest.raises(ValueError, match="devices"):  # 8 is not dp * 3
        plan_main(["--devices", "8", "--cp", "3"])


def test_plan_nothing_fits(capsys):
    assert plan_main("--model llama-30b --devices 1 --hardware tpu-v5e".split()) == 0
    assert "nothing fits" in capsys.readouterr().out
