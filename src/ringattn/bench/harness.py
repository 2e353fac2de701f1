"""The one harness every ``ringattn bench`` command (and ``ringattn check``) runs on: argument
checks in the parent, W local gloo ranks, warm-up/repeat clocks, seeded inputs and the
single-process SDPA reference. Each benchmark module states only what it measures.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from ..cli import Parser, positive
from ..kernels import KERNELS
from ..launch import init_distributed, launch
from ..layouts import LAYOUTS, permutation, shard
from . import output

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GRADS = ("out", "dq", "dk", "dv")

# --- arguments, checked in the parent -------------------------------------------------------


def parser(name: str, doc: str | None, out: str | None = None, repeats: int = 0) -> Parser:
    """The command's parser; with ``out``, ``--repeats`` (default ``repeats``, if any) and
    :func:`output.add_output_args` (``--out runs/bench/<out>.jsonl``, ``--png``, ``--md``)."""
    p = Parser(prog=f"ringattn {name}", description=doc)
    if repeats:
        p.add_argument(
            "--repeats", type=positive, default=repeats, help="timed runs after a warm-up"
        )
    if out:
        output.add_output_args(p, out)
    return p


def parse(p: argparse.ArgumentParser, argv: list[str], problems: Callable, **opts):
    """The options, with ``args.problems = problems(args)`` checked by :func:`check_problems`."""
    args = p.parse_args(argv)
    args.problems = problems(args)
    check_problems(p, args.problems, **opts)
    return args


def problem_args(
    p: argparse.ArgumentParser, *, world, seq, many=(), dtypes=("fp32", "bf16"), extra=()
) -> None:
    """--world, --seq, --layout, --dtype, --heads, --head-dim and ``extra`` of --kv-heads,
    --kernel, --batch; options named in ``many`` take several values (a sweep)."""
    n = {k: "+" if k in many else None for k in ("world", "seq", "layout", "dtype")}
    p.add_argument("--world", type=positive, nargs=n["world"], default=world)
    if seq is not None:
        p.add_argument("--seq", type=positive, nargs=n["seq"], default=seq)
    lay = list(LAYOUTS) if "layout" in many else "zigzag"
    p.add_argument("--layout", nargs=n["layout"], default=lay, choices=LAYOUTS)
    dt = ["fp32"] if "dtype" in many else "fp32"
    p.add_argument("--dtype", nargs=n["dtype"], default=dt, choices=list(dtypes))
    p.add_argument("--heads", type=positive, default=8)
    p.add_argument("--head-dim", type=positive, default=64)
    if "kv_heads" in extra:
        p.add_argument("--kv-heads", type=positive, default=None)
    if "kernel" in extra:
        p.add_argument("--kernel", default="auto", choices=KERNELS)
    if "batch" in extra:
        p.add_argument("--batch", type=positive, default=1)


def problem_error(row: dict, world_opt: str = "--world", seq_opt: str = "--seq") -> str | None:
    """Why the ranks would reject ``row`` (a one-line message naming the option), or None."""
    w, s, lay, h, hk = row["world"], row["seq"], row["layout"], row["heads"], row["kv_heads"]
    step = 2 * w if lay == "zigzag" else w
    if s % step:
        why = "zigzag splits it into 2W chunks" if lay == "zigzag" else "each rank holds seq / W"
        return (
            f"{seq_opt}: global sequence {s} with --layout {lay} and {world_opt} {w} must be "
            f"a multiple of {step} ({why}); use {max(s // step, 1) * step} or "
            f"{-(-s // step) * step}"
        )
    if h % hk:
        return f"--heads {h} must be a multiple of --kv-heads {hk} (GQA shares each K/V head)"
    if row.get("strategy") == "ulysses" and h % w:
        return f"--strategy ulysses splits --heads {h} over {world_opt} {w}: use heads % W == 0"
    if row.get("strategy") == "hybrid" and h % row.get("ulysses", 2):
        return f"--strategy hybrid splits --heads {h} over 2 Ulysses ranks: use an even count"
    return None


def check_problems(p: argparse.ArgumentParser, rows: Iterable[dict], **opts) -> None:
    """``p.error`` (one line, exit 2) on the first row the ranks would reject."""
    for row in rows:
        msg = problem_error(row, **opts)
        if msg:
            p.error(msg)


# a row's problem keys, in order, with their defaults (``seq`` and ``world`` have none)
PROBLEM = dict(strategy="ring", layout="zigzag", causal=True, dtype="fp32", seq=None, batch=1,
               heads=8, kv_heads=None, head_dim=64, kernel="auto")  # fmt: skip


def problem(*, world: int, seq: int, **kw) -> dict:
    """One benchmark row's problem description (the keys ``bench attention`` rows use);
    keys beyond :data:`PROBLEM` follow them."""
    row = dict(world=world, **PROBLEM) | dict(seq=seq, **kw)
    return row | dict(kv_heads=row["kv_heads"] or row["heads"])


def problem_of(args: argparse.Namespace, **over) -> dict:
    """:func:`problem` from the options this command has; ``over`` replaces any."""
    return problem(**{k: getattr(args, k) for k in PROBLEM if hasattr(args, k)} | over)


# --- inputs and ranks -----------------------------------------------------------------------


def make_inputs(row: dict, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Global q (b, s, h, d), k, v (b, s, h_kv, d) and dout (b, s, h, d), seeded, CPU."""
    g = torch.Generator().manual_seed(seed)
    b, s, h, hk, d = row["batch"], row["seq"], row["heads"], row["kv_heads"], row["head_dim"]
    dt = DTYPES[row["dtype"]]
    shapes = ((b, s, h, d), (b, s, hk, d), (b, s, hk, d), (b, s, h, d))
    return tuple(torch.randn(shape, generator=g).to(dt) for shape in shapes)


def local_inputs(row: dict, rank: int, world: int, layout: str | None = None, grad=False):
    """This rank's shards of :func:`make_inputs` (contiguous): q, k, v (requiring grad when
    ``grad``) and dout."""
    lay = layout or row["layout"]
    q, k, v, do = (
        shard(t, lay, rank=rank, world_size=world).contiguous() for t in make_inputs(row)
    )
    return (*(t.requires_grad_(grad) for t in (q, k, v)), do)


def _on_rank(fn: Callable, threads: int, device: str, args: tuple):
    rank, world, _ = init_distributed(threads=threads, device=device)
    return fn(rank, world, *args)


def run_ranks(fn: Callable, world: int, *args, threads=1, device="cpu", here=None) -> list:
    """``fn(rank, world, *args)`` (module-level) on ``world`` local ranks in one launch, results
    in rank order; ``here`` (default: ``world == 1``) runs one rank in this process."""
    if world == 1 if here is None else here:
        return [fn(0, 1, *args)]
    res = launch(_on_rank, world, fn, threads, device, args)
    return [res[r] for r in range(world)]


def barrier() -> None:
    """Line the ranks up before a clock starts (nothing without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# --- clocks ---------------------------------------------------------------------------------


@contextlib.contextmanager
def clock(into: dict, key: str = ""):
    """Wall time into ``into[key + '_s']`` (``'wall_s'`` without a key) and this process's
    CPU time (all its threads, gloo's included) into ``into[key + '_cpu_s']`` (``'cpu_s'``)."""
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    into[f"{key}_s" if key else "wall_s"] = time.perf_counter() - t0
    into[f"{key}_cpu_s" if key else "cpu_s"] = time.process_time() - c0


def timed(run: Callable, repeats: int, key: str = "cpu_s", warmup: int = 1) -> tuple[dict, float]:
    """``warmup`` untimed calls, then ``repeats`` timed ones; ``run()`` returns its own
    measurements (a dict) or is clocked whole. The call with the least ``key`` and the median
    of ``key`` (CPU time, the default, does not count waiting for a core)."""
    for _ in range(warmup):
        run()
    runs = []
    for _ in range(max(repeats, 1)):
        m: dict = {}
        with clock(m):
            got = run()
        runs.append(got if isinstance(got, dict) else m)
    return min(runs, key=lambda r: r[key]), statistics.median(r[key] for r in runs)


# --- the single-process SDPA reference ------------------------------------------------------


def sdpa(row: dict, q, k, v):
    """``F.scaled_dot_product_attention`` of q (b, h, s, d), k, v (b, h_kv, s, d) for ``row``."""
    gqa = row["heads"] != row["kv_heads"]
    return F.scaled_dot_product_attention(q, k, v, is_causal=row["causal"], enable_gqa=gqa)


def sdpa_reference(row: dict, repeats: int) -> dict:
    """Single-process ``F.scaled_dot_product_attention`` on the whole problem, in this
    process (set its threads first): best fwd and fwd+bwd wall and CPU seconds."""
    inputs = make_inputs(row)
    q, k, v, _ = (t.transpose(1, 2) for t in inputs)  # (b, h, s, d) views

    def run() -> dict:
        m: dict = {}
        with torch.no_grad(), clock(m, "fwd"):
            sdpa(row, q, k, v)
        fb = sdpa_grads(row, inputs)
        return dict(m, fwdbwd_s=fb["wall_s"], fwdbwd_cpu_s=fb["cpu_s"])

    return timed(run, repeats, key="fwdbwd_s")[0]


def sdpa_grads(row: dict, inputs=None) -> dict:
    """One SDPA fwd+bwd on the whole problem (``inputs``: :func:`make_inputs`, made here when
    None): out, dq, dk, dv (b, s, h, d) in global order, and its ``wall_s`` / ``cpu_s``."""
    q, k, v, do = (t.transpose(1, 2) for t in inputs or make_inputs(row))  # (b, h, s, d) views
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    m: dict = {}
    with clock(m):
        out = sdpa(row, q, k, v)
        out.backward(do)
    got = dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)
    return dict(m, **{n: t.transpose(1, 2) for n, t in got.items()})


def max_errors(ref: dict, per_rank: list[dict], layout: str, world: int) -> dict:
    """Max |ranks - ref| of out, dq, dk, dv after restoring the global token order."""
    inv = torch.argsort(permutation(ref["out"].shape[1], layout, world))
    got = {n: torch.cat([r[n] for r in per_rank], dim=1)[:, inv] for n in GRADS}
    return {n: float((got[n].float() - ref[n].float()).abs().max()) for n in GRADS}
