"""``ringattn bench memory``: per-rank peak memory of attention fwd+bwd vs sequence and W (live
tensor bytes and RSS growth), and the longest context a per-rank budget allows, from a
linear fit and from the planner. Method and results: docs/benchmarks.md.
"""

from __future__ import annotations

import torch

from ..memstat import MIB, measure_call, prepare_rss
from ..model.config import PRESETS, get_preset
from ..plan.cost import attention_elems, max_context
from ..plan.fit import fit_budget
from ..plan.hardware import HARDWARE, get_hardware
from ..ring import ring_attention
from . import harness as h
from . import output


def _call(row: dict, rank: int, world: int):
    """fwd+bwd of this rank's ring call (or, ``impl == 'sdpa'``, single-process SDPA on the
    whole problem) as a function of nothing, and the MB of its inputs."""
    if row["impl"] == "sdpa":
        q, k, v, do = (t.transpose(1, 2) for t in h.make_inputs(row))  # (b, h, s, d)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        attn = lambda: h.sdpa(row, q, k, v)
    else:
        q, k, v, do = h.local_inputs(row, rank, world, grad=True)
        attn = lambda: ring_attention(q, k, v, causal=row["causal"], layout=row["layout"])
    inputs_mb = sum(t.numel() * t.element_size() for t in (q, k, v, do)) / MIB
    return lambda: attn().backward(do), inputs_mb


def measure_rows(rank: int, world: int, rows: list[dict]) -> list[dict]:
    """This rank's memory per row (ring rows; ``impl == 'sdpa'`` rows in one process)."""
    rss = prepare_rss()
    # a tiny ring call connects gloo pairs and runs one-time lazy initialisation; the first
    # full-size call also grows thread-local arenas and lazy state once: run the first row
    # untracked so RSS growth measures the call, not the process warming up
    t = torch.randn(1, 4, 1, 8, requires_grad=True)
    ring_attention(t, t, t, causal=True, layout=rows[0]["layout"]).sum().backward()
    _call(rows[0], rank, world)[0]()
    out = []
    for row in rows:
        call, inputs_mb = _call(row, rank, world)
        out.append(dict(measure_call(call, rss), inputs_mb=inputs_mb))
    return out


def summarize(row: dict, ranks: list[dict]) -> dict:
    peak = max(r["peak_live_mb"] for r in ranks)
    inputs = max(r["inputs_mb"] for r in ranks)
    growth = [r["rss_growth_mb"] for r in ranks if r["rss_growth_mb"] is not None]
    # bytes of one rank's local q block (b, s/W, h, d), the unit of the table, and what the
    # planner counts for the ring's attention (the paper's 6 blocks)
    local, d, nbytes = row["seq"] // row["world"], row["head_dim"], h.DTYPE_BYTES[row["dtype"]]
    q_block = row["batch"] * local * row["heads"] * d * nbytes
    dims = (row["batch"], local, row["seq"], row["heads"] * d, row["kv_heads"] * d)
    planner = attention_elems("ring", *dims) * nbytes / MIB
    return dict(
        row, kind="measure", local_seq=local, inputs_mb=inputs, peak_extra_mb=peak,
        peak_total_mb=inputs + peak, rss_growth_mb=max(growth) if growth else None,
        blocks=peak * MIB / q_block,
        planner_attention_mb=planner if row["impl"] == "ring" else None,
    )  # fmt: skip


def _linearity(rows: list[dict]) -> list[dict]:
    """Add ``per_rank = max_seq / W`` and its ratio to the first row's (1.00 = linear in W)."""
    first = next((r for r in rows if r["max_seq"] > 0), None)
    for r in rows:
        r["per_rank"] = r["max_seq"] / r["world"]
        r["vs_linear"] = r["per_rank"] / (first["max_seq"] / first["world"]) if first else None
    return rows


def _series(rows: list[dict], kind: str, key=lambda r: (r["impl"], r["world"])) -> dict:
    """key(row) (default: (impl, W)) -> the rows of ``kind`` with it, sorted by seq, W."""
    out: dict = {}
    for r in (r for r in rows if r.get("kind") == kind):
        out.setdefault(key(r), []).append(r)
    return {k: sorted(v, key=lambda r: (r.get("seq", 0), r["world"])) for k, v in out.items()}


def max_context_rows(rows: list[dict], budget_mb: float, align: int = 1) -> list[dict]:
    """Per (impl, W): fit peak_total_mb vs global seq, solve for the budget.

    Linearity is judged from the smallest W > 1: a one-rank ring sends nothing, so it holds
    no receive buffers and is not on the same line.
    """
    out = []
    for (impl, w), mine in sorted(_series(rows, "measure").items()):
        seqs, peaks = [r["seq"] for r in mine], [r["peak_total_mb"] for r in mine]
        a, b, seq = fit_budget(seqs, peaks, budget_mb, step=align * w)
        source = "measured fit" if impl == "ring" else "measured fit (SDPA)"
        out.append(dict(kind="max_context", source=source, impl=impl, world=w,
                        budget_mb=budget_mb, mb_per_1k_tokens=a * 1024, intercept_mb=b,
                        max_seq=seq))  # fmt: skip
    ring = [r for r in out if r["impl"] == "ring"]
    _linearity([r for r in ring if r["world"] > 1])
    # the one-rank ring first, then the ring over W > 1, then SDPA
    return sorted(out, key=lambda r: (r["impl"] != "ring", r["world"] > 1))


def planner_rows(model: str, hardware: str, worlds: list[int], mem_mb: float | None) -> list[dict]:
    """The planner's longest context (full training memory: states, activations, attention,
    logits) for a model preset at cp = W, with the device memory overridden to ``mem_mb``."""
    cfg = get_preset(model)
    hw = get_hardware(hardware, mem_bytes=mem_mb * MIB if mem_mb else None)
    budget = hw.mem_bytes / MIB
    src = f"planner: {model}, {budget:,.0f} MB/rank"
    return _linearity([
        dict(kind="max_context", source=src, impl="ring", world=w, budget_mb=budget,
             max_seq=max_context(cfg, hw, cp=w))
        for w in worlds
    ])  # fmt: skip


COLUMNS = output.columns(
    "impl=impl; world=W; seq=global seq; local_seq=tokens/rank; inputs_mb=inputs MB:.0f; "
    "peak_extra_mb=peak live MB (call):.1f; blocks== q blocks:.1f; "
    "peak_total_mb=inputs + peak MB:.1f; rss_growth_mb=RSS growth MB:.0f; "
    "planner_attention_mb=planner 6 blocks MB:.1f",
)

CTX_COLUMNS = output.columns(
    "source=source; impl=impl; world=W; budget_mb=budget MB/rank:.0f; "
    "mb_per_1k_tokens=MB per 1K global tokens:.2f; max_seq=max context:,; "
    "per_rank=max context / W:,.0f; vs_linear=(max/W) / first:.2f",
)

NOTES = (
    "Per rank, largest rank, fwd+bwd of causal {layout} attention, {dtype}, {heads} heads x "
    "{head_dim}. Method and columns: docs/benchmarks.md#memory."
)


def plot(rows: list[dict], path: str) -> None:
    fig, axes = output.figure(2, figsize=(10, 4))
    for (impl, w), mine in sorted(_series(rows, "measure").items()):
        label, style = ("SDPA, 1 process", "k--o") if impl == "sdpa" else (f"ring W={w}", "-o")
        axes[0].plot(
            [r["seq"] for r in mine], [r["peak_total_mb"] for r in mine], style, label=label
        )
    output.style(axes[0], "global sequence (tokens)", "peak MB per rank (inputs + live tensors)",
            "per-rank peak memory, attention fwd+bwd", logx=2, logy=2)  # fmt: skip
    ctx = [r for r in rows if r["impl"] == "ring" and r.get("max_seq", 0) > 0]
    for src, mine in _series(ctx, "max_context", lambda r: r["source"]).items():
        ws = [r["world"] for r in mine]
        line = axes[1].plot(ws, [r["max_seq"] for r in mine], "-o", label=src)
        s0, w0 = mine[-1]["max_seq"], ws[-1]  # dotted: linear in W through the last point
        axes[1].plot(ws, [s0 * w / w0 for w in ws], ":", color=line[0].get_color(), lw=1)
    ws = sorted({r["world"] for r in ctx if r.get("kind") == "max_context"})
    output.style(axes[1], "W (ranks)", "longest context (tokens)",
            "longest context at a fixed per-rank budget (dotted: ~W)", logx=2, logy=2,
            ticks=ws, legend=7)  # fmt: skip
    output.save(fig, path, rows)


def main(argv: list[str]) -> int:
    p = h.parser("bench memory", __doc__, out="memory")
    h.problem_args(p, world=[1, 2, 4, 8], seq=[2048, 4096, 8192, 16384], many=("world", "seq"))
    p.add_argument("--no-sdpa", action="store_true", help="skip the single-process SDPA rows")
    p.add_argument("--budget-mb", type=float, default=256.0, help="per-rank budget for max ctx")
    p.add_argument("--plan-model", nargs="+", default=["tiny", "llama-7b"], choices=PRESETS)
    p.add_argument("--plan-hardware", default="a100-nvlink", choices=[*HARDWARE, "cpu"])
    p.add_argument("--plan-world", type=h.positive, nargs="+", default=[2, 4, 8, 16])
    args = h.parse(p, argv, lambda a: [h.problem_of(a, world=w, seq=s, impl="ring")
                                       for w in sorted(set(a.world)) for s in a.seq])  # fmt: skip
    probs: dict = {}  # W -> its rows
    for r in args.problems:
        probs.setdefault(r["world"], []).append(r)
    if 1 in probs and not args.no_sdpa:  # in this process: the one-rank ring, then SDPA
        probs[1] += [dict(r, impl="sdpa") for r in probs[1]]
    torch.set_num_threads(1)
    rows = []
    for w, mine in probs.items():
        ranks = h.run_ranks(measure_rows, w, mine)
        rows += [summarize(r, [rk[i] for rk in ranks]) for i, r in enumerate(mine)]
    ctx = max_context_rows(rows, args.budget_mb, align=2 if args.layout == "zigzag" else 1)
    for model in args.plan_model:
        # the tiny model at the measured budget; real models at the hardware's own memory
        mem = args.budget_mb if model == "tiny" else None
        ctx += planner_rows(model, args.plan_hardware, args.plan_world, mem)
    tables = [(rows, COLUMNS), (ctx, CTX_COLUMNS)]
    return output.report(output.stamp(rows + ctx, "memory"), args, tables, NOTES, plot)
