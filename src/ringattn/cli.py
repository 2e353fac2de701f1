"""``ringattn`` command line: train | bench | plan | simulate | demo | check | prepare |
export; and the parser every one of them uses."""

from __future__ import annotations

import argparse
import sys

USAGE = """usage: ringattn <command> [options]

commands:
  train       train the LLaMA-style model with context parallelism (TOML + overrides)
  bench       benchmarks: attention|scaling|weak|memory|layouts|peers|calibrate|train|all
              (`ringattn bench --help`; `bench train`: trainer tokens/s and MFU vs cp)
  plan        planner: block size, memory, longest context (`--help`)
  simulate    discrete-event ring simulator (`--help`)
  demo        the main job: train on the retrieval task, 4 local CPU ranks, 8K context
              (= `ringattn train --config configs/demo.toml`, what `make demo` runs)
  check       verified ring attention run against single-process SDPA
  prepare     tokenize documents (.txt/.jsonl/.parquet) into a token dataset (`--help`)
  export      a training checkpoint -> Hugging Face LlamaForCausalLM folder (`--help`)
"""


class Parser(argparse.ArgumentParser):
    """argparse whose usage error is a one-line ``ValueError`` naming the option and the fix;
    :func:`main` prints it as ``ringattn <command>: ...`` (exit 2), as it does the config and
    input checks, so every command fails the same way."""

    def error(self, message: str):
        raise ValueError(f"{message} (see {self.prog} --help)")


def positive(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n


COMMANDS = ("train", "bench", "plan", "simulate", "demo", "check", "prepare", "export")


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit code. Errors a user can fix reach the terminal as
    one line: a ``ValueError`` from checking the input (exit 2), or the one-line error of a
    rank that failed (:class:`ringattn.launch.RankError`, exit 1); Ctrl-C is exit 130."""
    from .launch import RankError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(
            f"ringattn: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    try:
        return _dispatch(cmd, rest)
    except RankError as e:
        print(f"ringattn {cmd}: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"ringattn {cmd}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ringattn {cmd}: interrupted", file=sys.stderr)
        return 130


def _dispatch(cmd: str, rest: list[str]) -> int:
    if cmd == "bench":
        from .bench.cli import bench_main

        return bench_main(rest)
    if cmd == "check":
        from .bench.check import main as check

        return check(rest)
    if cmd == "demo":
        # the main job: `ringattn train --config demo` (the config shipped with the package)
        from .train.cli import demo_main

        return demo_main(rest)
    if cmd == "plan":
        from .plan.cli import plan_main

        return plan_main(rest)
    if cmd == "simulate":
        from .plan.cli import simulate_main

        return simulate_main(rest)
    if cmd in ("prepare", "export"):
        from .data.cli import export_main, prepare_main

        return (prepare_main if cmd == "prepare" else export_main)(rest)
    if cmd == "train":
        from .train.cli import train_main

        return train_main(rest)
    raise ValueError(f"unknown command {cmd!r}")  # not reached: main checked COMMANDS


if __name__ == "__main__":
    sys.exit(main())
