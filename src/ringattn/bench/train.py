"""``ringattn bench train``: tokens/s, TFLOP/s per rank and MFU of the real trainer at a fixed
global context per context-parallel degree (median over the steps after warm-up), and
tokens/s per core-second (W ranks share the cores).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..cp import STRATEGIES
from ..model.config import PRESETS
from ..train.cli import run_worker
from ..train.config import load_config
from ..train.traced import count_worker
from . import harness as h
from . import output


def parse(argv: list[str]):
    p = h.parser("bench train", __doc__)
    p.add_argument("--cp", type=h.positive, nargs="+", default=[1, 2, 4])
    p.add_argument("--seq", type=h.positive, default=4096, help="global tokens per sequence")
    p.add_argument("--steps", type=h.positive, default=6)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the summary")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--strategy", default="ring", choices=STRATEGIES)
    p.add_argument("--layout", default="zigzag", choices=h.LAYOUTS)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--peak-tflops", type=float, default=0.3, help="per rank, for MFU")
    p.add_argument("--dir", default="runs/bench/train")
    p.add_argument("--out", default=None, help="append JSON lines here (default: stdout)")
    p.add_argument(
        "--count-comm",
        action="store_true",
        help="also report torch.distributed calls per step by function (rank 0) and the CPU "
        "seconds per step (process time, max over ranks)",
    )
    a = p.parse_args(argv)
    if not 0 <= a.warmup < a.steps:
        p.error(f"--warmup {a.warmup} must be >= 0 and below --steps {a.steps}")
    m = PRESETS[a.preset]
    probs = [h.problem(world=cp, seq=a.seq, layout=a.layout, strategy=a.strategy, heads=m.n_heads,
                       kv_heads=m.n_kv_heads) for cp in a.cp]  # fmt: skip
    h.check_problems(p, probs, world_opt="--cp")
    try:
        a.configs = {cp: config(a, cp) for cp in a.cp}
    except ValueError as e:  # what the trainer's own checks reject
        p.error(str(e).splitlines()[0])
    return a


def config(a, cp: int):
    return load_config(
        None,
        [
            f"--model.preset={a.preset}", f"--parallel.cp={cp}",
            f"--parallel.strategy={a.strategy}", f"--parallel.layout={a.layout}",
            f"--data.seq_len={a.seq}", "--data.batch_size=1", f"--train.steps={a.steps}",
            f"--train.dtype={a.dtype}", f"--train.peak_tflops={a.peak_tflops}",
            f"--train.out_dir={Path(a.dir) / f'cp{cp}'}", "--train.log_every=1",
            "--train.progress=false", "--train.plot=false", "--eval.n_seqs=1",
            f"--eval.seq_len={a.seq}",
        ],
    )  # fmt: skip


def _worker(rank: int, world: int, cfg_dict: dict) -> dict:
    return run_worker(cfg_dict)  # joins the group itself, with the trainer's settings


def run_one(a, cp: int) -> dict:
    cfg = a.configs[cp]
    log = Path(cfg.train.out_dir) / "metrics.jsonl"
    log.unlink(missing_ok=True)  # a fresh log per run
    par = cfg.parallel
    fn = count_worker if a.count_comm else _worker
    ranks = h.run_ranks(fn, cp, cfg.to_dict(), threads=par.threads_per_rank,
                        device=par.device, here=False)  # fmt: skip
    summary = ranks[0]
    steps = [r for r in output.read_rows(str(log)) if "tokens_per_s" in r][a.warmup :]
    med = lambda key: statistics.median(r[key] for r in steps)
    tok_s = med("tokens_per_s")
    row = dict(
        bench="train", preset=a.preset, cp=cp, strategy=a.strategy, layout=a.layout,
        dtype=a.dtype, seq=a.seq, steps_measured=len(steps), step_time_s=med("step_time_s"),
        tokens_per_s=tok_s, tokens_per_core_s=tok_s * cp / min(cp, output.cores()),
        tflops_per_rank=med("tflops_per_rank"), mfu=med("mfu"), peak_tflops=a.peak_tflops,
        peak_mem_mb_per_rank=summary["peak_mem_mb_per_rank"], final_loss=summary["final_loss"],
    )  # fmt: skip
    if a.count_comm:  # fields only with the flag: the default rows stay as they are
        per_step = summary["per_step"][a.warmup :]
        row["cpu_s_per_step"] = statistics.median(p["cpu_s"] for p in per_step)
        row["dist_calls_per_step"] = per_step[-1]["calls"]
    return row


COLUMNS = output.columns(
    "cp=cp; seq=seq; step_time_s=step s:.2f; tokens_per_s=tokens/s:,.0f; "
    "tokens_per_core_s=tokens/core-s:,.0f; tflops_per_rank=TFLOP/s/rank:.3f; mfu=MFU:.1%; "
    "peak_mem_mb_per_rank=peak MiB/rank",
    peak_mem_mb_per_rank=lambda r: f"{max(r['peak_mem_mb_per_rank']):,.0f}",
)


def main(argv: list[str]) -> int:
    a = parse(argv)
    return output.stream((run_one(a, cp) for cp in a.cp), a.out, COLUMNS)
