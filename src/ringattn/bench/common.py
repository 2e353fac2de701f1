"""Pieces every ``ringattn bench`` command shares: inputs, clocks, the single-process SDPA
reference, the machine description, JSON lines, markdown tables and matplotlib figures.

A benchmark *row* is a flat dict: the problem (world, layout, causal, dtype, seq, batch, heads,
kv_heads, head_dim, kernel, ...) plus what was measured. Rows go to ``--out`` as JSON lines;
the table printed on stdout is a view of the same rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# --- problems -----------------------------------------------------------------------------


def problem(
    *,
    world: int,
    seq: int,
    layout: str = "zigzag",
    causal: bool = True,
    dtype: str = "fp32",
    batch: int = 1,
    heads: int = 8,
    kv_heads: int | None = None,
    head_dim: int = 64,
    kernel: str = "auto",
    strategy: str = "ring",
    **extra,
) -> dict:
    """One benchmark row's problem description (the keys ``bench attention`` rows use)."""
    return dict(
        world=world,
        strategy=strategy,
        layout=layout,
        causal=causal,
        dtype=dtype,
        seq=seq,
        batch=batch,
        heads=heads,
        kv_heads=kv_heads or heads,
        head_dim=head_dim,
        kernel=kernel,
        **extra,
    )


def make_inputs(row: dict, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Global q (b, s, h, d), k, v (b, s, h_kv, d) and dout (b, s, h, d), seeded, CPU."""
    g = torch.Generator().manual_seed(seed)
    b, s, h, hk, d = row["batch"], row["seq"], row["heads"], row["kv_heads"], row["head_dim"]
    dt = DTYPES[row["dtype"]]
    q = torch.randn(b, s, h, d, generator=g).to(dt)
    k = torch.randn(b, s, hk, d, generator=g).to(dt)
    v = torch.randn(b, s, hk, d, generator=g).to(dt)
    do = torch.randn(b, s, h, d, generator=g).to(dt)
    return q, k, v, do


def block_bytes(row: dict) -> int:
    """Bytes of one rank's local q block (b, s/W, h, d): the unit of the memory tables."""
    local = row["seq"] // row["world"]
    return row["batch"] * local * row["heads"] * row["head_dim"] * DTYPE_BYTES[row["dtype"]]


# --- clocks -------------------------------------------------------------------------------


@contextlib.contextmanager
def clock(into: dict, key: str):
    """Wall time into ``into[key + '_s']`` and this process's CPU time (all its threads,
    gloo's included) into ``into[key + '_cpu_s']``."""
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    into[f"{key}_s"] = time.perf_counter() - t0
    into[f"{key}_cpu_s"] = time.process_time() - c0


def best_of(fn: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Least wall and least CPU seconds of ``fn`` over ``repeats`` calls after a warm-up.

    CPU time is the one to trust on a busy machine: it does not count waiting for a core.
    """
    fn()
    wall = cpu = float("inf")
    for _ in range(max(repeats, 1)):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def sdpa_reference(row: dict, repeats: int) -> dict:
    """Single-process ``F.scaled_dot_product_attention`` on the whole problem, in this
    process (set its threads first): best fwd and fwd+bwd wall and CPU seconds."""
    q, k, v, do = (t.transpose(1, 2) for t in make_inputs(row))  # (b, h, s, d) views
    kw = dict(is_causal=row["causal"], enable_gqa=row["heads"] != row["kv_heads"])
    best = None
    for _ in range(repeats + 1):  # the first run warms up
        ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
        m: dict = {}
        with torch.no_grad(), clock(m, "fwd"):
            F.scaled_dot_product_attention(q, k, v, **kw)
        with clock(m, "fwdbwd"):
            F.scaled_dot_product_attention(ql, kl, vl, **kw).backward(do)
        if best is None or m["fwdbwd_s"] < best["fwdbwd_s"]:
            best = m
    return best


class ReferenceCache:
    """SDPA reference timings keyed by the global problem, so sweeps over W time it once."""

    KEYS = ("seq", "causal", "dtype", "batch", "heads", "kv_heads", "head_dim")

    def __init__(self, repeats: int):
        self.repeats, self._done = repeats, {}

    def __call__(self, row: dict) -> dict:
        key = tuple(row[k] for k in self.KEYS)
        if key not in self._done:
            self._done[key] = sdpa_reference(row, self.repeats)
        return self._done[key]


# --- the machine --------------------------------------------------------------------------


def cores() -> int:
    """CPU cores this process may run on (what W local ranks share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What a row was measured on; the load average says how busy the box was meanwhile."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return dict(
        cpu=cpu_model(),
        cores=cores(),
        torch=torch.__version__,
        cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        loadavg_1m=load,
    )


def machine_line(m: dict | None = None) -> str:
    m = m or machine()
    dev = f", GPU {m['cuda']}" if m.get("cuda") else ", no GPU"
    load = f", load avg {m['loadavg_1m']:.1f}" if m.get("loadavg_1m") is not None else ""
    return f"{m['cpu']}, {m['cores']} cores{dev}, torch {m['torch']}{load}"


# --- output -------------------------------------------------------------------------------


def add_output_args(p: argparse.ArgumentParser, name: str) -> None:
    """``--out`` (JSON lines, appended), ``--png`` and ``--md`` (the table, written)."""
    p.add_argument(
        "--out", default=f"runs/bench/{name}.jsonl", help="append JSON lines here ('-': none)"
    )
    p.add_argument("--png", default=None, help="write the plot here")
    p.add_argument("--md", default=None, help="also write the markdown table here")


def write_rows(rows: Iterable[dict], path: str | None) -> None:
    """Append rows as JSON lines (``None`` or ``'-'``: write nothing)."""
    if not path or path == "-":
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


Column = tuple[str, str, "str | Callable[[dict], str]"]


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """``columns``: (key, header, format) where format is a ``str.format`` pattern applied to
    ``row[key]`` or a function of the whole row; a missing value prints as ``-``."""

    def cell(r: dict, key: str, fmt) -> str:
        if callable(fmt):
            return fmt(r)
        v = r.get(key)
        return "-" if v is None else fmt.format(v)

    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def report(rows: list[dict], table: str, args: argparse.Namespace, notes: str = "") -> None:
    """Write the JSON lines and the optional markdown file; print the table on stdout."""
    write_rows(rows, args.out)
    text = table + (f"\n\n{notes}" if notes else "")
    print(text)
    if getattr(args, "md", None):
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(text + "\n")
    if args.out and args.out != "-":
        print(f"\nrows appended to {args.out}", file=sys.stderr)


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str, title_note: str | None = None) -> None:
    """Save ``fig`` as a PNG; ``title_note`` (e.g. the machine) goes under the plots."""
    if title_note:
        fig.text(0.5, 0.005, title_note, ha="center", va="bottom", fontsize=7, color="0.35")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
    else:
        fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    print(f"wrote {path}", file=sys.stderr)


def fmt_s(x: float | None) -> str:
    """Seconds with 3 significant digits (``-`` for None)."""
    return "-" if x is None else f"{x:.3g}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.0%}"
