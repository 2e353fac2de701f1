"""Per-rank activation memory at a fixed global context, as the cp degree grows.

``python -m ringattn.train.memory --seq-len 16384 --cp 1 2 4`` launches, for each cp, that
many local ranks (dp = tp = 1), builds the model exactly as the trainer does, runs one
forward + backward over one sequence of ``seq-len`` tokens and reports per rank:

* ``saved_mib``: bytes of the tensors autograd keeps for backward (``saved_tensors_hooks``,
  one count per storage, parameters excluded) -- the activation memory itself, exact and
  deterministic;
* ``rss_increase_mib`` (CPU): the process's peak resident set (``ru_maxrss``) after the step
  minus its resident set just before it -- what the OS saw, including temporaries and
  allocator caching, so noisier;
* ``cuda_increase_mib`` (CUDA): the allocator's peak during the step minus its usage before.

At a fixed global context each rank holds ``seq/cp`` tokens, so both should fall as 1/cp.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ringattn.launch import init_distributed, launch
from ringattn.memstat import MIB, SavedBytes, peak_rss_mib, rss_mib
from ringattn.train.config import load_config

__all__ = ["measure_rank", "measure_step", "memory_main"]


def measure_step(trainer, batch) -> dict:
    """Memory of one training forward + backward of ``trainer`` on the global ``batch``
    (collective; no optimizer step). MiB on this rank."""
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before_rss = rss_mib("VmRSS")
    before_cuda = torch.cuda.memory_allocated() if cuda else 0
    saved = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        loss_sum, _ = trainer._loss(batch)
    loss_sum.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    out = {
        "saved_mib": saved.mib,
        "rss_before_mib": before_rss,
        "rss_increase_mib": peak_rss_mib() - before_rss,
    }
    if cuda:
        out["cuda_increase_mib"] = (torch.cuda.max_memory_allocated() - before_cuda) / MIB
    return out


def measure_rank(cfg_dict: dict) -> dict:
    """One launched rank: build the trainer, measure one step at ``data.seq_len``."""
    import torch.distributed as dist

    from ringattn.train.config import Config
    from ringattn.train.trainer import Trainer

    cfg = Config.from_dict(cfg_dict)
    init_distributed(threads=cfg.parallel.threads_per_rank, device=cfg.parallel.device)
    try:
        trainer = Trainer(cfg)
        batch = trainer.data.batch(0, cfg.data.batch_size, cfg.data.seq_len)
        return {
            "rank": dist.get_rank(),
            "cp": trainer.dims.cp,
            "local_tokens": cfg.data.seq_len * cfg.data.batch_size // trainer.dims.cp,
            **measure_step(trainer, batch),
        }
    finally:
        dist.destroy_process_group()


def _table(rows: list[dict]) -> str:
    base = rows[0]["saved_mib"]
    lines = [
        "| cp | tokens/rank | saved activations/rank (MiB) | x cp=1 | RSS increase/rank (MiB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cp']} | {r['local_tokens']} | {r['saved_mib']:.1f} | "
            f"{r['saved_mib'] / base:.3f} | {r['rss_increase_mib']:.0f} |"
        )
    return "\n".join(lines)


def memory_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m ringattn.train.memory", allow_abbrev=False)
    ap.add_argument("--seq-len", type=int, default=16384, help="global tokens (fixed)")
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--config", default=None, help="TOML config (model, layout, dtype, ac)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args, overrides = ap.parse_known_args(argv)
    rows = []
    for cp in args.cp:
        cfg = load_config(
            args.config,
            [
                *overrides,
                f"--parallel.cp={cp}",
                "--parallel.dp=1",
                "--parallel.tp=1",
                f"--data.seq_len={args.seq_len}",
                "--data.batch_size=1",
                "--data.curriculum=[]",
            ],
        )
        per_rank = launch(measure_rank, cp, cfg.to_dict(), threads_per_rank=1)
        ranks = [per_rank[r] for r in sorted(per_rank)]
        worst = max(ranks, key=lambda r: r["saved_mib"])
        rows.append({**worst, "per_rank": ranks})
        print(
            f"cp={cp}: saved {worst['saved_mib']:.1f} MiB/rank, RSS +"
            f"{worst['rss_increase_mib']:.0f} MiB/rank",
            flush=True,
        )
    print(_table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(memory_main(sys.argv[1:]))
