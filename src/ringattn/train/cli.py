"""``ringattn train --config FILE [--section.key=value ...]`` and ``ringattn demo``.

Under ``torchrun`` the command runs as is on every rank (NCCL on GPUs). Otherwise it starts
``dp * cp * tp`` local ranks itself through PyTorch's elastic launcher (gloo on CPU, one
intra-op thread each unless ``parallel.threads_per_rank`` says otherwise), so one command
is enough on a laptop.

Everything that can be checked without ranks is checked first, in this process: the whole
config (``ringattn.train.checks``), and whether a resumed run has anything left to do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ringattn.cli import Parser
from ringattn.launch import init_distributed, launch, under_torchrun
from ringattn.train.config import Config, load_config

__all__ = ["demo_main", "run_worker", "train_main"]

_EPILOG = (
    "Any field can be overridden: --section.key=value, e.g. --parallel.cp=4 "
    "--data.seq_len=8192 --optim.lr=3e-3 --data.curriculum='[[256,32,100]]'. "
    "Sections: model, parallel, data, optim, train, checkpoint, eval."
)


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


def _parser(prog: str, description: str, config_help: str) -> argparse.ArgumentParser:
    ap = Parser(prog=prog, allow_abbrev=False, description=description, epilog=_EPILOG)
    ap.add_argument("--config", help=config_help)
    ap.add_argument("--print-config", action="store_true", help="print the config and exit")
    return ap


def _nothing_to_do(cfg: Config) -> str | None:
    """Why there is nothing to train (a finished run re-run, or ``train.steps = 0``), or
    None. Reads the newest checkpoint's step without starting any rank."""
    from ringattn.train.checkpoint import completed_steps

    c, steps = cfg.checkpoint, cfg.train.steps
    ckpt_dir = Path(c.dir or Path(cfg.train.out_dir) / "checkpoints")
    done = completed_steps(ckpt_dir) if c.enabled and c.resume else 0
    if done < steps:
        return None
    if done == 0:
        return "nothing to do: train.steps=0 (pass --train.steps=N to train N steps)"
    return (
        f"nothing to do: the checkpoint in {ckpt_dir} has completed {done} steps and "
        f"train.steps={steps}; pass --train.steps=N with N > {done} to train further"
    )


def _report(summary: dict) -> None:
    if summary.get("nothing_to_do"):
        print(f"nothing to do: already at step {summary['steps']} ({summary['checkpoint']})")
        return
    ev = summary.get("eval") or {}
    steps, here = summary["steps"], len(summary["losses"])
    resumed = f" ({here} in this run)" if here != steps else ""
    print(
        f"done: {steps} steps{resumed} in {summary['train_time_s']:.0f}s, "
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


def train_main(argv: list[str], parser: argparse.ArgumentParser | None = None) -> int:
    """Entry point of ``ringattn train``; returns the exit code. Raises ValueError (one line:
    the option and the fix) for a bad config, ``RankError`` when a rank fails."""
    ap = parser or _parser(
        "ringattn train",
        "Train a LLaMA-style model with ring attention, FSDP and TP.",
        "a TOML file, or a shipped config: demo, tiny (defaults if omitted)",
    )
    args, rest = ap.parse_known_args(argv)
    try:
        cfg = load_config(args.config, rest)
    except OSError as e:  # an unreadable --config file
        raise ValueError(f"--config {args.config}: {e.strerror or e}") from None
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    p = cfg.parallel
    if under_torchrun():
        from ringattn.train.checks import check_config

        check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        summary = run_worker(cfg.to_dict())
    else:
        if (why := _nothing_to_do(cfg)) is not None:
            print(why)
            return 0
        world = p.dp * p.cp * p.tp
        results = launch(run_worker, world, cfg.to_dict(), threads_per_rank=p.threads_per_rank)
        summary = results[0]
    if summary is not None and (not under_torchrun() or int(os.environ.get("RANK", "0")) == 0):
        _report(summary)
    return 0


def demo_main(argv: list[str]) -> int:
    """``ringattn demo [--section.key=value ...]``: ``ringattn train --config demo``."""
    ap = _parser(
        "ringattn demo",
        "The main job: the tiny LLaMA-style model learns long-context retrieval with zigzag "
        "ring attention (cp = 4) and FSDP on 4 local CPU ranks, finishing at 8192 tokens. "
        "Same as `ringattn train --config demo` (the config shipped with ringattn).",
        "a TOML file instead of the shipped demo config",
    )
    ap.set_defaults(config="demo")
    return train_main(argv, parser=ap)


def _main() -> int:
    from ringattn.launch import RankError

    try:
        return train_main(sys.argv[1:])
    except (ValueError, RankError) as e:
        print(f"ringattn train: {' '.join(str(e).split())}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1


if __name__ == "__main__":
    sys.exit(_main())
