"""The trainer with every step traced, for ``ringattn bench train --count-comm``."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..dist_trace import trace_dist
from ..launch import init_distributed
from .config import Config
from .trainer import Trainer


def count_worker(rank: int, world: int, cfg_dict: dict) -> dict:
    """One rank of ``run_worker`` with every train step traced: torch.distributed calls by
    function and CPU seconds (process time of this rank; the summary keeps rank 0's calls and
    the max CPU time over ranks)."""
    cfg = Config.from_dict(cfg_dict)
    init_distributed(threads=cfg.parallel.threads_per_rank, device=cfg.parallel.device)
    try:
        trainer, per_step = Trainer(cfg), []
        step_fn = trainer.train_step

        def traced_step(step: int) -> dict:
            with trace_dist() as trace:
                c0 = time.process_time()
                row = step_fn(step)
                cpu = time.process_time() - c0
            per_step.append({"calls": dict(sorted(trace.calls.items())), "cpu_s": cpu})
            return row

        trainer.train_step = traced_step
        summary = trainer.fit()
        cpu = torch.tensor(
            [p["cpu_s"] for p in per_step], dtype=torch.float64, device=trainer.device
        )
        dist.all_reduce(cpu, op=dist.ReduceOp.MAX)
        for p, c in zip(per_step, cpu.tolist()):
            p["cpu_s"] = c
        summary["per_step"] = per_step
        return summary
    finally:
        dist.destroy_process_group()
