"""``ringattn train --config FILE [--section.key=value ...]``.

Under ``torchrun`` the command runs as is on every rank (NCCL on GPUs). Otherwise it starts
``dp * cp * tp`` local ranks itself through PyTorch's elastic launcher (gloo on CPU, one
intra-op thread each unless ``parallel.threads_per_rank`` says otherwise), so one command
is enough on a laptop.
"""

from __future__ import annotations

import argparse
import json
import sys

from ringattn.launch import init_distributed, launch, under_torchrun
from ringattn.train.config import Config, load_config

__all__ = ["run_worker", "train_main"]


def run_worker(cfg_dict: dict) -> dict:
    """One rank: join the group, train, leave. Returns the trainer's summary."""
    import torch.distributed as dist

    from ringattn.train.trainer import Trainer

    cfg = Config.from_dict(cfg_dict)
    p = cfg.parallel
    init_distributed(threads=p.threads_per_rank, device=p.device)
    try:
        return Trainer(cfg).fit()
    finally:
        dist.destroy_process_group()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ringattn train",
        allow_abbrev=False,
        description="Train a LLaMA-style model with ring attention, FSDP and TP.",
        epilog="Any field can be overridden: --section.key=value, e.g. --parallel.cp=4 "
        "--data.seq_len=8192 --optim.lr=3e-3 --data.curriculum='[[256,32,100]]'. "
        "Sections: model, parallel, data, optim, train, checkpoint, eval.",
    )
    ap.add_argument("--config", help="TOML file (configs/*.toml); defaults if omitted")
    ap.add_argument("--print-config", action="store_true", help="print the config and exit")
    return ap


def _report(summary: dict) -> None:
    ev = summary.get("eval") or {}
    print(
        f"done: {summary['steps']} steps in {summary['train_time_s']:.0f}s, "
        f"final train loss {summary['final_loss']:.4f}"
    )
    if ev:
        print(
            f"eval at seq {ev['eval_seq_len']}: loss {ev['eval_loss']:.4f}, "
            f"accuracy {ev['eval_acc']:.3f} ({ev['eval_targets']} targets)"
        )
    peaks = ", ".join(f"{m:,.0f}" for m in summary["peak_mem_mb_per_rank"])
    print(f"peak memory per rank (MiB): {peaks}")
    if summary.get("metrics"):
        print(f"metrics: {summary['metrics']}")
    if summary.get("loss_curve"):
        print(f"loss curve: {summary['loss_curve']}")


def train_main(argv: list[str]) -> int:
    """Entry point of ``ringattn train``; returns the exit code."""
    args, rest = _parser().parse_known_args(argv)
    try:
        cfg = load_config(args.config, rest)
    except (ValueError, OSError) as e:
        print(f"ringattn train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    p = cfg.parallel
    if under_torchrun():
        summary = run_worker(cfg.to_dict())
    else:
        world = p.dp * p.cp * p.tp
        results = launch(run_worker, world, cfg.to_dict(), threads_per_rank=p.threads_per_rank)
        summary = results[0]
    if summary is not None and (not under_torchrun() or summary.get("metrics")):
        _report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
