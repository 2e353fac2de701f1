"""What every ``ringattn bench`` command writes: the machine stamp, rows as JSON lines
(``--out``), markdown tables on stdout (``--md``), and PNG figures (``--png``).

A benchmark *row* is a flat dict: the problem (world, layout, causal, dtype, seq, batch, heads,
kv_heads, head_dim, kernel, ...) plus what was measured. The table printed on stdout is a
view of the same rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

# --- the machine ----------------------------------------------------------------------------


def cores() -> int:
    """CPU cores this process may run on (what W local ranks share)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # not Linux


def machine() -> dict:
    """What a row was measured on; the load average says how busy the box was meanwhile."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return dict(cpu=cpu, cores=cores(), torch=torch.__version__, cuda=cuda, loadavg_1m=load)


def machine_line(m: dict | None = None) -> str:
    m = m or machine()
    dev = f", GPU {m['cuda']}" if m.get("cuda") else ", no GPU"
    load = f", load avg {m['loadavg_1m']:.1f}" if m.get("loadavg_1m") is not None else ""
    return f"{m['cpu']}, {m['cores']} cores{dev}, torch {m['torch']}{load}"


def stamp(rows: list[dict], bench: str, **extra) -> list[dict]:
    """Each row with the benchmark's name and the machine (one stamp per run)."""
    m = machine()
    return [dict(r, bench=bench, machine=m, **extra) for r in rows]


# --- output ---------------------------------------------------------------------------------


def add_output_args(p: argparse.ArgumentParser, name: str | None) -> None:
    """``--out`` (JSON lines, appended; ``name=None``: stdout), ``--png`` and ``--md``."""
    out = f"runs/bench/{name}.jsonl" if name else None
    p.add_argument("--out", default=out, help=f"append JSON lines here (default {out or 'stdout'})")
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


def stream(rows: Iterable[dict], path: str | None, cols: Sequence[Column]) -> int:
    """Write each row as soon as it is measured (to ``path``, or on stdout without one), then
    the table of them all (on stderr when stdout has the rows). Returns 0 (the exit code)."""
    done = []
    for row in rows:
        write_rows([row], path) if path else print(json.dumps(row), flush=True)
        done.append(row)
    print(markdown_table(done, cols), file=sys.stdout if path else sys.stderr)
    return 0


def read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


Column = tuple[str, str, "str | Callable[[dict], str]"]


def columns(spec: str, **fmts) -> list[Column]:
    """Table columns from ``"key=header:format; ..."`` (see :func:`markdown_table` for the
    format; none: ``{}``); ``fmts[key]``, a function of the row, replaces it."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        key, _, rest = item.partition("=")
        head, _, fmt = rest.rpartition(":") if ":" in rest else (rest, "", "")
        fmt, slash, unit = fmt.partition("/")  # "{:}" formats as "{}" does
        out.append((key, head, fmts.get(key) or "{:" + fmt + "}" + slash + unit))
    return out


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """``columns``: (key, header, format) where format is a function of the whole row or a
    ``str.format`` pattern for ``row[key]``, each element of a list space-separated; a
    pattern ending in ``/unit`` prints the value divided by unit (``{:.1f}/1e9``: GFLOP).
    A missing value prints as ``-``."""

    def cell(r: dict, key: str, fmt) -> str:
        if callable(fmt):
            return fmt(r)
        v, (pattern, _, unit) = r.get(key), fmt.partition("/")
        if v is None:
            return "-"
        vals = [x / float(unit) if unit else x for x in (v if isinstance(v, list) else [v])]
        return " ".join(pattern.format(x) for x in vals)

    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def report(rows: list[dict], args, tables: Sequence, notes="", plot=None, **fmt) -> int:
    """Write the JSON lines, print each table (a list of columns; ``(rows, columns)`` for
    other rows) of ``rows`` and ``notes`` formatted with the options, ``cores`` and ``fmt``
    (also to ``--md``), draw ``plot(rows, args.png)``. Returns 0 (a command's exit code)."""
    write_rows(rows, args.out)
    tabs = [markdown_table(*(t if isinstance(t, tuple) else (rows, t))) for t in tables]
    notes = notes.format(**{**vars(args), "cores": cores(), **fmt})
    text = "\n\n".join(tabs) + (f"\n\n{notes}" if notes else "")
    print(text)
    if getattr(args, "md", None):
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(text + "\n")
    if args.out and args.out != "-":
        print(f"\nrows appended to {args.out}", file=sys.stderr)
    if plot is not None and getattr(args, "png", None):
        plot(rows, args.png)
    return 0


def figure(ncols: int, figsize: tuple[float, float]):
    """A figure with ``ncols`` subplots side by side: (fig, axes), one ``ax`` for 1. A bare
    matplotlib ``Figure`` (as ``plan.simulate.to_png``): no pyplot state, nothing to close;
    matplotlib is imported only when plotting."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols)


def style(ax, xlabel: str, ylabel: str, title=None, logx=None, logy=None, ticks=None, legend=8):
    """Labels, log scales (``logx``/``logy``: the base, 10 or 2), integer x ticks, grid and
    legend (its font size; 0: none) of one subplot."""
    if logx:
        ax.set_xscale("log", base=logx)
    if logy:
        ax.set_yscale("log", base=logy)
    if ticks:
        ax.set_xticks(ticks, [str(x) for x in ticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=legend)


def save(fig, path: str, rows: Sequence[dict], title: str | None = None) -> None:
    """Save ``fig`` as a PNG under ``title``; the machine of the first row that has one goes
    under the plots."""
    if title:
        fig.suptitle(title, fontsize=10)
    m = next((r["machine"] for r in rows if r.get("machine")), None)
    fig.text(0.5, 0.005, machine_line(m), ha="center", va="bottom", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)
