"""``ringattn`` command line: train | bench | plan | simulate | demo | check."""

from __future__ import annotations

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
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        from .bench.cli import bench_main

        return bench_main(rest)
    if cmd == "check":
        from .bench.check import main as check

        return check(rest)
    if cmd == "demo":
        # the main job: `ringattn train --config configs/demo.toml` (run from the repo root)
        from .train.cli import train_main

        return train_main(["--config", "configs/demo.toml", *rest])
    if cmd == "plan":
        from .plan.cli import plan_main

        return plan_main(rest)
    if cmd == "simulate":
        from .plan.cli import simulate_main

        return simulate_main(rest)
    if cmd == "train":
        from .train.cli import train_main

        return train_main(rest)
    print(f"unknown command {cmd!r}\n\n{USAGE}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
