"""``ringattn bench peers``: ringattn, ring-flash-attn 0.1.8 and PyTorch's native
``context_parallel`` (both on PyTorch's CPU flash op through :mod:`.peer_adapters`) and
ring-attention-pytorch and JAX's ringattention (when installed) in one run: same inputs, same
zigzag shards, same gloo ranks (1 thread each; JAX: W XLA CPU devices in a process of its own,
:mod:`.peer_jax`), causal. Per impl: fwd+bwd time (median of --repeats after a warm-up)
and max |error| of out, dq, dk, dv against a float64 oracle, next to single-process SDPA's
error in the input dtype (naive). See docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ..layouts import shard
from ..memstat import MIB, free_mib
from ..ring import ring_attention
from . import harness as h
from . import output, peer_adapters, peer_jax
from .oracle import reference

FP32_TOL = 1e-4  # relative to max |oracle|: the floor of "ok" (2x naive is the rule)
_prob = lambda r: (r["world"], r["seq"], r["dtype"])  # one problem of the sweep

# --- implementations: a context (world) yielding attention (q, k, v) -> out on this rank's
# shards (b, s_local, h, d) in the impl's layout


def _ringattn(precision: str, kernel: str = "auto"):
    opts = dict(causal=True, kernel=kernel, grad_precision=precision)
    return lambda world: contextlib.nullcontext(lambda q, k, v: ring_attention(q, k, v, **opts))


def _rfa(world: int):
    fn = peer_adapters.ring_flash_attn_zigzag()
    return contextlib.nullcontext(lambda q, k, v: fn(q, k, v, causal=True))


def _lucidrains(world: int):
    from ring_attention_pytorch import ring_flash_attn

    # its striped mask indexes buckets across ranks: exact only with one bucket per rank
    return contextlib.nullcontext(lambda q, k, v: ring_flash_attn(
        q, k, v, causal=True, bucket_size=q.shape[1], ring_reduce_col=True, striped_ring_attn=True
    ))  # fmt: skip


@functools.cache
def _mesh(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))  # one per rank process, reused by every turn


@contextlib.contextmanager
def _torch_cp(rotate: str, world: int):
    from torch.distributed.tensor.experimental import context_parallel

    # our zigzag shards are its head-tail shards already: it is given one dummy buffer (it
    # wants one) to choose the head-tail balancer, and its SDPA sees the (b, h, s, d) shards
    dummy, mesh = torch.zeros(1, 1, 2 * world, 1), _mesh(world)
    cp = context_parallel(mesh, buffers=[dummy], buffer_seq_dims=[2])
    with peer_adapters.torch_cp_cpu_rule(rotate), cp:
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        yield lambda *qkv: sdpa(*(t.transpose(1, 2) for t in qkv)).transpose(1, 2)


IMPLS = {  # name -> (layout, its context)
    "ringattn-exact": ("zigzag", _ringattn("exact")),
    "ringattn-fast": ("zigzag", _ringattn("fast")),
    "ringattn-blockwise": ("zigzag", _ringattn("exact", "blockwise")),
    "ring-flash-attn": ("zigzag", _rfa),
    "torch-cp": ("zigzag", functools.partial(_torch_cp, "allgather")),  # torch's default
    "torch-cp-alltoall": ("zigzag", functools.partial(_torch_cp, "alltoall")),
    "ring-attention-pytorch": ("striped", _lucidrains),
}
JAX = "jax-ringattention"  # not on our ranks: its own process (peer_jax)
LAYOUT = {i: lay for i, (lay, _) in IMPLS.items()} | {JAX: "contiguous"}
TORCH_CP = ("torch-cp", "torch-cp-alltoall")
MODULES = {"ring-flash-attn": "ring_flash_attn", "ring-attention-pytorch": "ring_attention_pytorch"}


def _installed(impl: str) -> bool:
    if impl == JAX:
        return peer_jax.installed()
    return importlib.util.find_spec(MODULES.get(impl, "torch")) is not None


def why_not(impl: str, row: dict, mem_bytes: float) -> str | None:
    """Why ``impl`` is not run on ``row`` with ``mem_bytes`` of free memory, or None."""
    if impl == "ring-attention-pytorch":
        if row["dtype"] != "fp32":  # seen on CPU, in one process or several
            dt = row["dtype"]
            return f"unsupported in {dt}: its einsum multiplies fp32 softmax weights by {dt} V"
        # one bucket per rank: ~8 (b, h, s/W, s/W) fp32 score-sized tensors live per rank
        # (measured: 4.1 GiB peak RSS per rank at W = 2, 8K, 8 heads)
        need = (
            row["world"] * 8 * row["batch"] * row["heads"] * (row["seq"] // row["world"]) ** 2 * 4
        )
        if need > mem_bytes / 2:
            return f"skipped: needs ~{need / 2**30:.0f} GiB (one bucket of scores per rank)"
    return None


def _run(impl: str, world: int, inputs: tuple, got: dict) -> dict:
    """One fwd+bwd of ``impl`` on this rank's shards ``inputs`` (q, k, v, dout): its wall and
    CPU time; out and the grads are left in ``got``."""
    q, k, v, do = inputs
    m: dict = {}
    with IMPLS[impl][1](world) as attn:
        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
        h.barrier()
        try:
            with h.clock(m):
                out = attn(ql, kl, vl)
                out.backward(do)
        except Exception as e:  # the launcher stops the other ranks and prints this line
            raise RuntimeError(f"{impl} failed ({e}); leave it out of --impls") from e
    got.update(out=out.detach(), dq=ql.grad, dk=kl.grad, dv=vl.grad)
    return m


def _rank(rank: int, world: int, rows: list[dict], bases: list[dict], plan, repeats) -> list:
    """Per problem and impl (``plan``: each row's impls, decided in the parent) on this rank:
    median fwd+bwd wall time, the CPU time of its fastest run and max |x - oracle| on this
    rank's tokens. The impls take turns (a warm-up round, then
    ``repeats`` timed rounds), so a change in the machine's load falls on all of them alike."""
    out = []
    for row, base, impls in zip(rows, bases, plan):
        if not impls:  # none of them runs on this problem
            out.append({})
            continue
        ref = torch.load(base["file"], mmap=True)  # the oracle (b, s, h, d) float64, lazily
        layouts = {IMPLS[i][0] for i in impls}
        inputs = {lay: h.local_inputs(row, rank, world, lay) for lay in layouts}
        runs: dict = {i: [] for i in impls}
        got: dict = {i: {} for i in impls}
        for turn in range(repeats + 1):
            # each turn starts one impl later: no impl always runs first (after the others'
            # frees) or last
            for i in impls[turn % len(impls) :] + impls[: turn % len(impls)]:
                m = _run(i, world, inputs[IMPLS[i][0]], got[i])
                if turn:  # turn 0 is the warm-up
                    runs[i].append(m)
        res = {}
        for i in impls:
            mine = {n: shard(t, IMPLS[i][0], rank=rank, world_size=world) for n, t in ref.items()}
            errs = {n: float((got[i][n].double() - mine[n]).abs().max()) for n in h.GRADS}
            wall = statistics.median(m["wall_s"] for m in runs[i])
            res[i] = dict(wall_s=wall, cpu_s=min(m["cpu_s"] for m in runs[i]), errs=errs)
        out.append(res)
    return out


def jax_rows(row: dict, base: dict, repeats: int, tmp: str) -> list[dict]:
    """JAX's ring in its own process: its row (times, max |x - oracle| in global order), or
    a row saying why it failed. It runs in the parent, so a failure costs only its row."""
    try:
        res = peer_jax.run(row, repeats, Path(tmp, "jax.pt"))
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        why = str(e).strip().splitlines()[-1]
        return [dict(row, impl=JAX, layout=LAYOUT[JAX], status=f"failed: {why}")]
    got, ref = torch.load(Path(tmp, "jax.pt")), torch.load(base["file"], mmap=True)
    errs = {n: float((got[n].double() - ref[n]).abs().max()) for n in h.GRADS}
    res = dict(wall_s=res["wall_s"], cpu_s=res["cpu_s"], errs=errs)
    return impl_rows(row, base, [{JAX: res}], [JAX])


def _status(errs: dict, base: dict) -> str:
    """ok, or the tensors over max(2x naive, FP32_TOL x max |oracle|) and their err / naive."""
    naive = {n: base[f"naive_err_{n}"] for n in h.GRADS}
    bound = {n: max(2 * naive[n], FP32_TOL * base["scale"][n]) for n in h.GRADS}
    bad = [f"{n} {errs[n] / naive[n]:.3g}x naive" for n in h.GRADS if not errs[n] <= bound[n]]
    return "WRONG " + ", ".join(bad) if bad else "ok"


def impl_rows(row: dict, base: dict, res: list[dict], impls) -> list[dict]:
    """One row per impl for one problem: wall time and errors (max over ranks), CPU time (sum),
    the single-process SDPA time and the naive errors."""
    rows = []
    for impl in impls:
        errs = {n: max(r[impl]["errs"][n] for r in res) for n in h.GRADS}
        wall = max(r[impl]["wall_s"] for r in res)
        rows.append(dict(
            row, impl=impl, layout=LAYOUT[impl], status=_status(errs, base), fwdbwd_s=wall,
            fwdbwd_cpu_s=sum(r[impl]["cpu_s"] for r in res), sdpa_s=base["sdpa_s"],
            vs_sdpa=wall / base["sdpa_s"], **{f"err_{n}": e for n, e in errs.items()},
            **{k: v for k, v in base.items() if k.startswith("naive_err_")},
        ))  # fmt: skip
    return rows


def note_rows(problems: list[dict], impls, mem_bytes: float) -> list[dict]:
    """Peers that did not run here, with the reason: not installed (one row), or not on a
    problem (a row for each)."""
    row = problems[0]
    missing = lambda i: "jax or ringattention" if i == JAX else MODULES[i]
    notes = [(row, i, f"skipped: {missing(i)} not installed") for i in impls if not _installed(i)]
    for r in problems:
        notes += [(r, i, why_not(i, r, mem_bytes)) for i in impls if _installed(i)]
    return [dict(r, impl=i, layout="-", status=s) for r, i, s in notes if s]


COLUMNS = output.columns(
    "world=W; seq=seq; dtype=dtype; impl=impl; status=status; fwdbwd_s=f+b s:.3f; "
    "vs_sdpa=/ SDPA:.2f; err_out=err out:.1e; err_dq=err dq:.1e; "
    "err_dk=err dk:.1e; err_dv=err dv:.1e; naive_err_dq=naive dq:.1e; naive_err_dv=naive dv:.1e"
)
SUMMARY = output.columns(
    "world=W; seq=seq; dtype=dtype; exact=ours exact s:.3f; cp=torch CP s:.3f; "
    "exact_vs_cp=exact / CP:.2f; fast=ours fast s:.3f; rfa=ring-flash-attn s:.3f; "
    "fast_vs_rfa=fast / rfa:.2f; sdpa=SDPA s:.3f; exact_vs_sdpa=exact / SDPA:.2f"
)
NOTES = (
    "W gloo ranks, 1 thread each, on {cores} cores (JAX: W XLA CPU devices in one process, "
    "contiguous); causal zigzag, {heads} heads x {head_dim}; "
    "fwd+bwd median of {repeats}. SDPA: single process, {cores} threads. err: max |x - float64 "
    "oracle|; ok: every err <= max(2x naive, {tol:g} x max |oracle|); naive: SDPA in the input "
    "dtype. torch CP: best of its rotate methods. Half-precision blocks run in fp32 on CPUs "
    "without bf16 units ({native})."
)


def summary(rows: list[dict]) -> list[dict]:
    """One line per problem: ours exact vs torch CP, ours fast vs ring-flash-attn, and SDPA."""
    out = {}
    for r in (r for r in rows if "fwdbwd_s" in r):
        s = out.setdefault(_prob(r), dict(r, sdpa=r["sdpa_s"]))
        key = {"ringattn-exact": "exact", "ringattn-fast": "fast", "ring-flash-attn": "rfa"}
        name = key.get(r["impl"], "cp" if r["impl"] in TORCH_CP else r["impl"])
        s[name] = min(s.get(name, float("inf")), r["fwdbwd_s"])  # torch CP: its best rotation
    for s in out.values():
        for a, b in (("exact", "cp"), ("fast", "rfa"), ("exact", "sdpa")):
            s[f"{a}_vs_{b}"] = s[a] / s[b] if a in s and b in s else None
    return list(out.values())


def plot(rows: list[dict], path: str) -> None:
    ran = [r for r in rows if "fwdbwd_s" in r]
    probs = list(dict.fromkeys(map(_prob, ran)))
    fig, ax = output.figure(1, figsize=(max(6, 0.8 * len(probs)), 4.5))
    for impl in dict.fromkeys(r["impl"] for r in ran):
        mine = [(probs.index(_prob(r)), r) for r in ran if r["impl"] == impl]
        (line,) = ax.plot([x for x, _ in mine], [r["vs_sdpa"] for _, r in mine], "o-", label=impl)
        bad = [(x, r["vs_sdpa"]) for x, r in mine if r["status"] != "ok"]
        if bad:  # a cross over each wrong result
            ax.plot(*zip(*bad), "x", ms=14, mew=2.5, color=line.get_color())
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(probs)), [f"W={w}\n{s}\n{d}" for w, s, d in probs], fontsize=7)
    output.style(ax, "", "fwd+bwd time / single-process SDPA", "peers (x: wrong)", logy=10)
    output.save(fig, path, ran)


def main(argv: list[str]) -> int:
    p = h.parser("bench peers", __doc__, out="peers", repeats=3)
    p.add_argument("--world", type=h.positive, nargs="+", default=[2, 4, 8])
    p.add_argument("--seq", type=h.positive, nargs="+", default=[8192, 16384])
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--heads", type=h.positive, default=8)
    p.add_argument("--head-dim", type=h.positive, default=64)
    p.add_argument("--impls", nargs="+", default=list(LAYOUT), choices=list(LAYOUT))
    grid = lambda a: [h.problem(world=w, seq=s, dtype=d, heads=a.heads, head_dim=a.head_dim)
                      for w in a.world for s in a.seq for d in a.dtype]  # fmt: skip
    args = h.parse(p, argv, grid)  # zigzag: seq % 2W == 0, checked before any rank starts
    impls = [i for i in dict.fromkeys(args.impls) if _installed(i) and i != JAX]
    jax = JAX in args.impls and _installed(JAX)
    torch.set_num_threads(output.cores())  # the single-process SDPA and the oracle
    rows, probs = [], lambda w: [r for r in args.problems if r["world"] == w]
    mem = free_mib() * MIB  # decided once, here: every rank must run the same impls
    plan = lambda r, impls: [i for i in impls if why_not(i, r, mem) is None]
    with tempfile.TemporaryDirectory() as tmp:
        # one float64 oracle per (seq, dtype), for every W; the ranks read their shards of it
        keys = {(r["seq"], r["dtype"]): r for r in args.problems}
        bases = {k: reference(r, Path(tmp, f"{i}.pt"), args.repeats)
                 for i, (k, r) in enumerate(keys.items())}  # fmt: skip
        for w in dict.fromkeys(args.world):
            mine = [bases[(r["seq"], r["dtype"])] for r in probs(w)]
            plans = [plan(r, impls) for r in probs(w)]
            res = h.run_ranks(_rank, w, probs(w), mine, plans, args.repeats, here=False)
            for j, (r, base) in enumerate(zip(probs(w), mine)):
                rows += impl_rows(r, base, [x[j] for x in res], plans[j])
                if jax:  # after the ranks are gone: its W devices get the cores to themselves
                    rows += jax_rows(r, base, args.repeats, tmp)
    rows = output.stamp(rows + note_rows(args.problems, args.impls, mem), "peers")
    native = "this one has them" if peer_adapters.cpu_half_is_native() else "this one has none"
    return output.report(rows, args, [(summary(rows), SUMMARY), COLUMNS], NOTES, plot,
                         tol=FP32_TOL, native=native)  # fmt: skip
