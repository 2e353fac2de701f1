"""``ringattn bench <what>``: dispatch to the benchmark modules, and ``all`` to run them in turn.

Each command writes JSON lines (``--out``, appended), prints a markdown table on stdout and
draws a PNG with ``--png``. Modules are imported only when their command runs.
"""

from __future__ import annotations

import importlib

from .harness import parser

# name -> (module, entry point, one line of help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "attention": ("attention", "main", "ring vs single-process SDPA at given W, seq, layout"),
    "scaling": ("scaling", "strong_main", "strong scaling: time vs global seq, SDPA and W=2,4,8"),
    "weak": ("scaling", "weak_main", "weak scaling: W and seq doubled together"),
    "memory": ("memory", "main", "per-rank peak memory vs seq and W; max context vs W"),
    "layouts": ("layouts", "main", "causal: per-rank FLOPs and time, contiguous/zigzag/striped"),
    "peers": ("peers", "main", "ring-flash-attn, torch native CP: time, float64-oracle errors"),
    "calibrate": ("calibrate", "main", "measure kernel and gloo rates; simulator vs measured"),
    "train": ("train", "main", "trainer step: tokens/s, TFLOP/s per rank, MFU vs cp"),
    "packed": ("packed", "main", "packed documents: per-rank FLOPs and time per layout"),
}

# ``all``: every command at its small defaults, outputs under one folder.
ALL_ORDER = ("calibrate", "scaling", "weak", "memory", "layouts", "peers", "packed")
# ... except peers, whose 16K half of the default sweep alone takes ~20 minutes on 2 cores
ALL_ARGS = {"peers": ["--seq", "8192"]}

USAGE = (
    "usage: ringattn bench {"
    + "|".join([*COMMANDS, "all"])
    + "} [options]\n\n"
    + "\n".join(f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items())
    + "\n  all        each of the above at its defaults: --dir DIR (default runs/bench)"
)


def _entry(name: str):
    mod, fn, _ = COMMANDS[name]
    return getattr(importlib.import_module(f"ringattn.bench.{mod}"), fn)


def run_all(argv: list[str]) -> int:
    """``bench all [--dir DIR]``: JSON, PNG and markdown of each command under DIR."""
    p = parser("bench all", f"Run {', '.join(ALL_ORDER)} in turn at their defaults.")
    p.add_argument("--dir", default="runs/bench", help="where the JSON, PNG and markdown go")
    out_dir = p.parse_args(argv).dir  # --help exits here; unknown arguments are an error
    status = 0
    for name in ALL_ORDER:
        print(f"\n## ringattn bench {name}\n", flush=True)
        args = ["--out", f"{out_dir}/{name}.jsonl", "--png", f"{out_dir}/{name}.png"]
        args += ["--md", f"{out_dir}/{name}.md", *ALL_ARGS.get(name, [])]
        status |= _entry(name)(args)
    return status


def bench_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name == "all":
        return run_all(rest)
    if name not in COMMANDS:  # ``ringattn`` prints it as one line, exit 2
        choices = ", ".join([*COMMANDS, "all"])
        raise ValueError(f"unknown benchmark {name!r}; choose one of {choices}")
    return _entry(name)(rest)
