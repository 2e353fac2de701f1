"""``ringattn plan`` and ``ringattn simulate``: argparse front ends over cost.py and simulate.py.

Examples::

    ringattn plan --model llama-7b --hardware a100-nvlink --devices 8 --cp 8 --checkpointing full
    ringattn plan --paper-table
    ringattn simulate --world 8 --seq 65536 --layout zigzag --causal --hardware a100-nvlink \
        --png ring.png
    ringattn simulate --world 8 --seq 65536 --layout packed --docs 1024   # packed documents
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from ringattn.cli import Parser, positive
from ringattn.model.config import PRESETS, get_preset
from ringattn.plan import cost, step
from ringattn.plan.hardware import HARDWARE, Hardware, get_hardware
from ringattn.plan.simulate import LAYOUTS, simulate, to_png

__all__ = ["plan_main", "simulate_main"]


def _add_hardware_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hardware", default="a100-nvlink", choices=[*sorted(HARDWARE), "cpu"])
    p.add_argument("--flops", type=float, help="override peak FLOP/s")
    p.add_argument("--mem", type=float, help="override device memory, bytes")
    p.add_argument("--bw", type=float, help="override one-way link bandwidth, bytes/s")
    p.add_argument("--latency", type=float, help="override per-message latency, seconds")
    p.add_argument("--efficiency", type=float, help="override attention fraction of peak")


def _add_docs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--docs",
        type=float,
        default=None,
        metavar="MEDIAN",
        help="packed documents: lognormal lengths of this median (64 tokens to seq), the "
        "work per rank and step from the real mask; needed by --layout packed",
    )
    p.add_argument("--docs-sigma", type=float, default=1.5)
    p.add_argument("--docs-seed", type=int, default=0)


def _cu_seqlens(a: argparse.Namespace, seq: int):
    """The synthetic pack of ``--docs`` (None without it)."""
    if a.docs is None:
        if a.layout == "packed":
            raise ValueError("--layout packed balances packed documents: add --docs MEDIAN")
        return None
    from ringattn.balance import lognormal_pack

    return lognormal_pack(seq, a.docs_seed, a.docs, a.docs_sigma)


def _hardware(a: argparse.Namespace) -> Hardware:
    return get_hardware(
        a.hardware,
        flops=a.flops,
        mem_bytes=a.mem,
        link_bw=a.bw,
        latency_s=a.latency,
        efficiency=a.efficiency,
    )


def _si(x: float, unit: str = "") -> str:
    """1.23e9 -> '1.23 G' (decimal prefixes, like the paper's GB/s and TFLOP/s)."""
    for p, k in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= k:
            return f"{x / k:.3g} {p}{unit}"
    return f"{x:.3g} {unit}"


def _gb(x: float) -> str:
    return f"{x / 1e9:9.2f} GB"


# --- plan -------------------------------------------------------------------------------


def _plan_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="ringattn plan",
        description="Memory, max context and step time of a context-parallel training run.",
    )
    p.add_argument("--paper-table", action="store_true", help="print the paper's c >= F/B table")
    p.add_argument("--model", default="llama-7b", choices=sorted(PRESETS))
    p.add_argument("--devices", type=positive, default=8, help="dp * cp * tp")
    p.add_argument("--cp", type=positive, default=None, help="context parallel size (default: all)")
    p.add_argument("--tp", type=positive, default=1)
    p.add_argument("--dp", type=positive, default=None, help="default: devices / (cp * tp)")
    p.add_argument("--seq", type=positive, default=None, help="global context (default: the max)")
    p.add_argument("--batch", type=positive, default=1, help="sequences per dp rank")
    p.add_argument("--strategy", default="ring", choices=cost.STRATEGIES)
    p.add_argument("--layout", default="zigzag", choices=[*LAYOUTS, "packed"])
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    _add_docs_args(p)
    p.add_argument("--checkpointing", default="full", choices=cost.CHECKPOINTING)
    p.add_argument("--no-fsdp", dest="fsdp", action="store_false")
    p.add_argument("--loss-chunk", type=positive, default=None, help="blockwise loss chunk, tokens")
    p.add_argument("--ffn-chunk", type=positive, default=None, help="blockwise FFN chunk (tokens)")
    p.add_argument("--json", action="store_true")
    _add_hardware_args(p)
    return p


def _paper_table(as_json: bool) -> int:
    rows = cost.paper_table(tuple(HARDWARE))
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print("Minimal block size c >= F/B and sequence per device 6c (Ring Attention paper rule)")
    print(f"{'hardware':<13}{'TFLOP/s':>9}{'GB/s':>8}{'min block c':>13}{'min seq 6c':>12}")
    for r in rows:
        star = "*" if r["hardware"] in cost.PAPER_HARDWARE else " "
        print(
            f"{r['hardware'] + star:<13}{r['tflops']:>9.0f}{r['link_gbps']:>8.1f}"
            f"{r['min_block']:>13,.0f}{r['min_seq_per_device']:>12,.0f}"
        )
    print("* figures from the paper's table (paper: ~1K, ~25K, ~1K); others: presets")
    return 0


def _plan(a: argparse.Namespace) -> dict:
    cfg = get_preset(a.model)
    if a.ffn_chunk is not None:
        cfg = replace(cfg, ffn_chunk=a.ffn_chunk)
    cp = a.cp or a.devices // a.tp
    dp = a.dp or a.devices // (cp * a.tp)
    if dp * cp * a.tp != a.devices:
        raise ValueError(f"dp*cp*tp = {dp}*{cp}*{a.tp} != devices ({a.devices})")
    hw = _hardware(a)
    kw = dict(
        batch=a.batch,
        dp=dp,
        tp=a.tp,
        strategy=a.strategy,
        checkpointing=a.checkpointing,
        fsdp=a.fsdp,
        loss_chunk=a.loss_chunk,
    )
    max_ctx = cost.max_context(cfg, hw, cp=cp, **kw)
    seq = a.seq or max_ctx
    out = {
        "model": a.model,
        "hardware": hw.as_dict(),
        "parallel": {"devices": a.devices, "dp": dp, "cp": cp, "tp": a.tp},
        "strategy": a.strategy,
        "layout": a.layout,
        "causal": a.causal,
        "checkpointing": a.checkpointing,
        "min_block_paper": cost.min_block_size(hw),
        "min_seq_per_device_paper": cost.min_seq_per_device(hw),
        "min_block_precise": cost.min_block_size_precise(
            hw,
            n_heads=cfg.n_heads // a.tp,
            kv_heads=max(cfg.kv_heads // a.tp, 1),
            head_dim=cfg.head_dim,
            causal=a.causal,
        ),
        "max_context": max_ctx,
        "seq": seq,
        "memory": None,
        "step": None,
    }
    if seq:
        out["memory"] = cost.memory_breakdown(cfg, seq, hw=hw, cp=cp, **kw).as_dict()
        step_kw = {k: kw[k] for k in ("batch", "dp", "tp", "strategy", "checkpointing")}
        cu = _cu_seqlens(a, seq)
        out["docs"] = None if cu is None else len(cu) - 1
        out["step"] = step.predict_step(
            cfg, hw, seq, cp=cp, layout=a.layout, causal=a.causal, cu_seqlens=cu, **step_kw
        ).as_dict()
    return out


def _print_plan(p: dict) -> None:
    hw, par = p["hardware"], p["parallel"]
    print(
        f"ringattn plan: {p['model']} on {par['devices']} x {hw['name']} "
        f"(dp={par['dp']} cp={par['cp']} tp={par['tp']}), {p['strategy']}/{p['layout']}"
        f"{', causal' if p['causal'] else ''}, checkpointing={p['checkpointing']}"
    )
    print(
        f"  hardware        {_si(hw['flops'], 'FLOP/s')} peak, {hw['mem_bytes'] / 1e9:.0f} GB, "
        f"link {_si(hw['link_bw'], 'B/s')} one-way, latency {hw['latency_s'] * 1e6:.3g} us, "
        f"attention eff {hw['efficiency']:.2f}, GEMM eff {hw['matmul_efficiency']:.2f}"
    )
    print(
        f"  min block       paper c >= F/B = {p['min_block_paper']:,.0f} tokens; "
        f"precise (this model, fwd, eff, latency) = {p['min_block_precise']:,.0f}"
    )
    print(
        f"  min seq/device  6c = {p['min_seq_per_device_paper']:,.0f} tokens "
        f"(global >= {p['min_seq_per_device_paper'] * par['cp']:,.0f})"
    )
    print(f"  max context     {p['max_context']:,} tokens (global)")
    if p["memory"] is None:
        print("  nothing fits: model states alone exceed device memory")
        return
    m = p["memory"]
    print(f"  memory / device at seq {p['seq']:,}:")
    for k in (
        "params",
        "grads",
        "optimizer",
        "fsdp_buffers",
        "activations",
        "layer_backward",
        "attention",
        "ffn",
        "logits",
    ):
        print(f"    {k:<15}{_gb(m[k])}")
    verdict = "fits" if m["fits"] else "DOES NOT FIT"
    print(f"    {'total':<15}{_gb(m['total'])}  of {m['budget'] / 1e9:.2f} GB usable: {verdict}")
    s = p["step"]
    print(
        f"  step time       {s['step_s']:.4g} s (attention {s['attention_s']:.4g} s, GEMMs "
        f"{s['linear_s']:.4g} s, exposed comm {s['exposed_comm_s']:.3g} s), "
        f"MFU {s['mfu']:.1%}, {s['tokens_per_s']:,.0f} tokens/s"
    )


def plan_main(argv: list[str]) -> int:
    """Entry point of ``ringattn plan``; returns the exit status."""
    a = _plan_parser().parse_args(argv)
    if a.paper_table:
        return _paper_table(a.json)
    p = _plan(a)  # a ValueError: one line from ``ringattn``, exit 2, as every command's
    if a.json:
        print(json.dumps(p, indent=2))
    else:
        _print_plan(p)
    return 0


# --- simulate ---------------------------------------------------------------------------


def _simulate_parser() -> argparse.ArgumentParser:
    p = Parser(prog="ringattn simulate", description="Simulate one layer of ring attention.")
    p.add_argument("--world", type=positive, default=8)
    p.add_argument("--seq", type=positive, default=65536, help="global sequence length")
    p.add_argument("--layout", default="zigzag", choices=[*LAYOUTS, "packed"])
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    _add_docs_args(p)
    p.add_argument("--model", choices=sorted(PRESETS), help="take heads and head_dim from it")
    p.add_argument("--heads", type=positive, default=32)
    p.add_argument("--kv-heads", type=positive, default=None)
    p.add_argument("--head-dim", type=positive, default=128)
    p.add_argument("--batch", type=positive, default=1)
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--png", help="write a timeline plot (world <= 16)")
    p.add_argument("--json", action="store_true")
    _add_hardware_args(p)
    return p


def simulate_main(argv: list[str]) -> int:
    """Entry point of ``ringattn simulate``; returns the exit status."""
    a = _simulate_parser().parse_args(argv)
    heads, kv_heads, head_dim = a.heads, a.kv_heads, a.head_dim
    if a.model:
        cfg = get_preset(a.model)
        heads, kv_heads, head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    r = simulate(  # a ValueError: one line from ``ringattn``, exit 2, as every command's
        a.world,
        a.seq,
        _hardware(a),
        layout=a.layout,
        causal=a.causal,
        batch=a.batch,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        backward=not a.forward_only,
        record=bool(a.png),
        cu_seqlens=_cu_seqlens(a, a.seq),
    )
    if a.png:
        to_png(r, a.png)
    if a.json:
        print(json.dumps(r.to_dict(), indent=2))
        return 0
    ms = lambda t: f"{t * 1e3:.4g} ms"
    print(
        f"ring attention, W={r.world}, seq={r.seq} (block {r.block}), {r.layout}"
        f"{', causal' if r.causal else ''}, {r.hardware}"
    )
    print(
        f"  per block       compute {ms(r.block_compute_s)} (full c x c, fwd), "
        f"K/V transfer {ms(r.block_transfer_s)}, dK/dV transfer {ms(r.acc_transfer_s)}"
    )
    print(f"  forward         {ms(r.fwd_s)} (exposed comm {ms(r.fwd_exposed_s)})")
    if not a.forward_only:
        print(f"  backward        {ms(r.bwd_s)} (exposed comm {ms(r.bwd_exposed_s)})")
    imb = f"{r.imbalance:.3f}" if r.imbalance != float("inf") else "inf"
    print(f"  busy per rank   min {ms(min(r.busy_s))}, max {ms(max(r.busy_s))} (max/min {imb})")
    print(f"  total           {ms(r.total_s)}, MFU {r.mfu:.1%}")
    if a.png:
        print(f"  timeline        {a.png}")
    return 0
