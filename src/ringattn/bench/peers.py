"""``ringattn bench peers``: other context-parallel attention implementations, side by side with
ringattn in the same ranks, on the same global problem, in the same run.

Per implementation: fwd+bwd wall time (slowest rank) and CPU time summed over ranks, the
ratios to ringattn with the same layout, and the max error of out, dq, dk, dv against
single-process SDPA (exactness is part of the comparison: a fast wrong answer is not a win).

* ``ring-attention-pytorch`` (lucidrains; CPU path ``ring_flash_attn`` with
  ``ring_reduce_col=True``: pure-torch einsum tiles of ``--peer-bucket`` tokens). Contiguous
  and striped layouts (its striped mode needs one bucket per rank). Imported lazily; skipped
  with a note when absent (``pip install --no-deps ring-attention-pytorch einops beartype
  jaxtyping wadler-lindig``: plain ``pip install`` may replace torch).
  ringattn with ``kernel="blockwise"`` (also pure torch) runs too, to separate the
  algorithm from the kernel.
* PyTorch's native context parallel (``torch.distributed.tensor.experimental.
  context_parallel``): attempted on CPU; the error it raises is recorded as the row's status.
* ``ring-flash-attn`` and ``flash_attn``: CUDA only; recorded as skipped without a GPU.

Each implementation first runs a tiny problem (gloo connects pairs lazily), then
``--repeats`` timed runs of the full one; the best wall time and the least CPU time count.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import time

import torch
import torch.nn.functional as F

from ..launch import init_distributed, launch
from ..layouts import permutation, shard
from ..ring import ring_attention
from .common import (
    add_output_args,
    cores,
    machine,
    machine_line,
    make_inputs,
    markdown_table,
    problem,
    pyplot,
    report,
    save,
    sdpa_reference,
)

GRADS = ("out", "dq", "dk", "dv")
FP32_TOL = 1e-4  # max abs error vs SDPA that counts as exact, fp32 inputs of unit scale


# --- implementations: each (q, k, v local (b, n, h, d), layout) -> out (b, n, h, d) ---------


def _ringattn(kernel: str):
    def run(q, k, v, *, layout: str, causal: bool, bucket: int):
        return ring_attention(q, k, v, causal=causal, layout=layout, kernel=kernel)

    return run


def _lucidrains(q, k, v, *, layout: str, causal: bool, bucket: int):
    from ring_attention_pytorch import ring_flash_attn

    striped = layout == "striped"
    n = q.shape[1]
    # its striped mask indexes buckets across ranks: exact only with one bucket per rank
    size = n if striped else min(bucket, n)
    return ring_flash_attn(
        q, k, v, causal=causal, bucket_size=size, ring_reduce_col=True, striped_ring_attn=striped
    )


IMPLS = {
    "ringattn": (_ringattn("auto"), ("contiguous", "zigzag", "striped")),
    "ringattn-blockwise": (_ringattn("blockwise"), ("contiguous",)),
    "ring-attention-pytorch": (_lucidrains, ("contiguous", "striped")),
}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _time_impl(fn, row: dict, layout: str, rank: int, world: int, barrier) -> dict:
    """One fwd+bwd of ``fn`` on this rank's shards: times and the local out/grads."""
    q, k, v, do = (
        shard(t, layout, rank=rank, world_size=world).contiguous() for t in make_inputs(row)
    )
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(q, k, v, layout=layout, causal=row["causal"], bucket=row["peer_bucket"])
    out.backward(do)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dict(wall_s=wall, cpu_s=cpu, out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def _try_torch_cp(row: dict, world: int) -> str:
    """Run SDPA under PyTorch's native context_parallel on CPU; 'ok' or the error raised.

    The attempt fails while propagating shardings, before any transfer, on every rank alike
    (so the group stays usable); both SDPA's default and MATH backends are tried.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        from torch.distributed.tensor.experimental import context_parallel
    except ImportError as e:
        return f"ImportError: {e}"
    mesh = init_device_mesh("cpu", (world,))
    errors = []
    for backend in (None, SDPBackend.MATH):
        # it shards the buffers in place (resizes them), so they must not require grad;
        # the differentiable leaves are made from the shards inside, as a model would
        q, k, v, _ = (t.transpose(1, 2).contiguous() for t in make_inputs(row))  # (b, h, s, d)
        name = "default" if backend is None else backend.name
        try:
            with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
                ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
                with contextlib.ExitStack() as stack:
                    if backend is not None:
                        stack.enter_context(sdpa_kernel(backend))
                    out = F.scaled_dot_product_attention(ql, kl, vl, is_causal=row["causal"])
                out.sum().backward()
            return f"ran ({name} backend)"
        except Exception as e:  # the point of the row is the error text
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            errors.append(f"{name} backend: {type(e).__name__}: {msg}")
    return "; ".join(errors)


def _rank_main(row: dict, plan: list[tuple[str, str]], repeats: int, torch_cp: bool) -> dict:
    """Every rank: each (impl, layout) in ``plan``, then the native-CP attempt."""
    import torch.distributed as dist

    rank, world, _ = init_distributed(threads=1, device="cpu", timeout_s=300)
    tiny = dict(row, seq=8 * world)
    res = {}
    for impl, layout in plan:
        fn = IMPLS[impl][0]
        _time_impl(fn, tiny, layout, rank, world, dist.barrier)  # connects the gloo pairs
        runs = [_time_impl(fn, row, layout, rank, world, dist.barrier) for _ in range(repeats)]
        best = min(runs, key=lambda r: r["wall_s"])
        res[(impl, layout)] = dict(best, cpu_s=min(r["cpu_s"] for r in runs))
    res["torch-cp"] = _try_torch_cp(row, world) if torch_cp else None
    return res


def _reference(row: dict) -> dict:
    """Single-process SDPA out and grads (b, s, h, d) in global order, fp32, and its time."""
    q, k, v, do = (t.transpose(1, 2) for t in make_inputs(row))  # (b, h, s, d) views
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    t0, c0 = time.perf_counter(), time.process_time()
    out = F.scaled_dot_product_attention(q, k, v, is_causal=row["causal"])
    out.backward(do)
    times = dict(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)
    got = dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)
    return dict(times, **{n: t.transpose(1, 2) for n, t in got.items()})


def _sdpa_times(row: dict, repeats: int) -> dict:
    t = sdpa_reference(row, repeats)
    return dict(wall_s=t["fwdbwd_s"], cpu_s=t["fwdbwd_cpu_s"])


def errors_vs(ref: dict, per_rank: list[dict], layout: str, world: int) -> dict:
    """Max |impl - SDPA| of out, dq, dk, dv after restoring global token order."""
    seq = ref["out"].shape[1]
    inv = torch.argsort(permutation(seq, layout, world))
    errs = {}
    for n in GRADS:
        got = torch.cat([r[n] for r in per_rank], dim=1)[:, inv]
        errs[f"err_{n}"] = float((got.float() - ref[n].float()).abs().max())
    return errs


def peer_rows(row: dict, res: dict, ref: dict, plan: list[tuple[str, str]]) -> list[dict]:
    world = row["world"]
    rows = []
    for impl, layout in plan:
        ranks = [res[r][(impl, layout)] for r in range(world)]
        errs = errors_vs(ref, ranks, layout, world)
        wrong = [n for n in GRADS if errs[f"err_{n}"] > FP32_TOL]
        rows.append(
            dict(
                row,
                impl=impl,
                layout=layout,
                status="exact" if not wrong else "WRONG " + ", ".join(wrong),
                fwdbwd_s=max(r["wall_s"] for r in ranks),
                fwdbwd_cpu_s=sum(r["cpu_s"] for r in ranks),
                sdpa_fwdbwd_s=ref["wall_s"],
                sdpa_fwdbwd_cpu_s=ref["cpu_s"],
                **errs,
            )
        )
    base = {r["layout"]: r for r in rows if r["impl"] == "ringattn"}
    for r in rows:
        b = base.get(r["layout"])
        if b is not None:
            r["wall_vs_ringattn"] = r["fwdbwd_s"] / b["fwdbwd_s"]
            r["cpu_vs_ringattn"] = r["fwdbwd_cpu_s"] / b["fwdbwd_cpu_s"]
        r["cpu_vs_sdpa"] = r["fwdbwd_cpu_s"] / ref["cpu_s"]
    return rows


def note_rows(row: dict, torch_cp: str | None, lucidrains: bool) -> list[dict]:
    """Implementations that did not run here, with the reason."""
    rows = []
    if torch_cp is not None:
        rows.append(dict(row, impl="torch native CP", layout="(its own)", status=torch_cp))
    if not lucidrains:
        rows.append(
            dict(
                row,
                impl="ring-attention-pytorch",
                layout="-",
                status="skipped: not installed (pip install --no-deps ring-attention-pytorch "
                "einops beartype jaxtyping wadler-lindig)",
            )
        )
    for impl, module in (("ring-flash-attn", "ring_flash_attn"), ("flash_attn", "flash_attn")):
        have = "installed" if _installed(module) else "not installed"
        if torch.cuda.is_available():
            status = f"skipped: {have}; the CUDA run is not part of this CPU benchmark yet"
        else:
            status = f"skipped: CUDA only, no GPU here ({have})"
        rows.append(dict(row, impl=impl, layout="-", status=status))
    return rows


COLUMNS = [
    ("impl", "impl", "{}"),
    ("layout", "layout", "{}"),
    ("status", "status", "{}"),
    ("fwdbwd_s", "f+b wall s", "{:.3f}"),
    ("fwdbwd_cpu_s", "CPU total s", "{:.3f}"),
    ("wall_vs_ringattn", "wall / ringattn", "{:.2f}"),
    ("cpu_vs_ringattn", "CPU / ringattn", "{:.2f}"),
    ("cpu_vs_sdpa", "CPU / SDPA", "{:.2f}"),
    ("err_out", "err out", "{:.1e}"),
    ("err_dq", "err dq", "{:.1e}"),
    ("err_dk", "err dk", "{:.1e}"),
    ("err_dv", "err dv", "{:.1e}"),
]

NOTES = (
    "W = {w} gloo ranks on {cores} cores, causal, global seq {seq}, fp32, {h} heads x {d}, "
    "fwd+bwd. Ratios > 1: slower than ringattn with the same layout. err: max |x - SDPA| over "
    "the whole sequence (exact: all <= {tol:g}). ring-attention-pytorch bucket {bucket}. "
    "Single-process SDPA: {sdpa:.3f} s CPU."
)


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    ran = [r for r in rows if r.get("fwdbwd_cpu_s") is not None]
    # break the long package name so neighbouring labels do not overlap
    labels = [f"{r['impl'].replace('-pytorch', chr(10) + 'pytorch')}\n{r['layout']}" for r in ran]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(ran)), 4))
    colors = ["tab:green" if r["status"] == "exact" else "tab:red" for r in ran]
    ax.bar(range(len(ran)), [r["cpu_vs_sdpa"] for r in ran], color=colors)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("CPU time / single-process SDPA (fwd+bwd)")
    ax.set_xticks(range(len(ran)), labels, fontsize=7)
    ax.set_title(
        f"peers, W={ran[0]['world']}, causal seq {ran[0]['seq']} (green: exact, red: wrong "
        "gradients)",
        fontsize=9,
    )
    ax.grid(alpha=0.3, axis="y")
    save(fig, path, machine_line(ran[0].get("machine")))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ringattn bench peers", description=__doc__)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--peer-bucket", type=int, default=1024, help="ring-attention-pytorch tile")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per impl (best kept)")
    p.add_argument("--no-torch-cp", action="store_true", help="skip the native CP attempt")
    add_output_args(p, "peers")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    row = problem(
        world=args.world,
        seq=args.seq,
        causal=True,
        heads=args.heads,
        head_dim=args.head_dim,
        peer_bucket=args.peer_bucket,
    )
    lucid = _installed("ring_attention_pytorch")
    plan = [(i, lay) for i, (_, lays) in IMPLS.items() for lay in lays]
    if not lucid:
        plan = [(i, lay) for i, lay in plan if i != "ring-attention-pytorch"]
    res = launch(_rank_main, args.world, row, plan, args.repeats, not args.no_torch_cp)
    ref = dict(_reference(row), **_sdpa_times(row, args.repeats))
    rows = peer_rows(row, res, ref, plan)
    rows += note_rows(row, res[0]["torch-cp"], lucid)
    m = machine()
    rows = [dict(r, bench="peers", machine=m) for r in rows]
    notes = NOTES.format(
        w=args.world,
        cores=cores(),
        seq=args.seq,
        h=args.heads,
        d=args.head_dim,
        tol=FP32_TOL,
        bucket=args.peer_bucket,
        sdpa=ref["cpu_s"],
    )
    report(rows, markdown_table(rows, COLUMNS), args, notes)
    if args.png:
        plot(rows, args.png)
    return 0
