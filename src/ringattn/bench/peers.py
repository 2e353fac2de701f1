"""``ringattn bench peers``: other context-parallel attention implementations (ring-attention-
pytorch, ringattn's blockwise kernel, PyTorch's native ``context_parallel``; flash libraries on
CUDA only) in the same ranks on the same problem: fwd+bwd time, ratios to ringattn and max
errors against single-process SDPA. See docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
import torch.nn.functional as F

from ..ring import ring_attention
from . import harness as h
from . import output

FP32_TOL = 1e-4  # max abs error vs SDPA that counts as exact, fp32 inputs of unit scale


# --- implementations: each (q, k, v local (b, n, h, d), layout) -> out (b, n, h, d) ---------


def _ringattn(kernel: str):
    def run(q, k, v, *, layout: str, causal: bool, bucket: int):
        return ring_attention(q, k, v, causal=causal, layout=layout, kernel=kernel)

    return run


def _lucidrains(q, k, v, *, layout: str, causal: bool, bucket: int):
    from ring_attention_pytorch import ring_flash_attn

    striped = layout == "striped"
    # its striped mask indexes buckets across ranks: exact only with one bucket per rank
    size = q.shape[1] if striped else min(bucket, q.shape[1])
    return ring_flash_attn(q, k, v, causal=causal, bucket_size=size, ring_reduce_col=True,
                           striped_ring_attn=striped)  # fmt: skip


IMPLS = {
    "ringattn": (_ringattn("auto"), ("contiguous", "zigzag", "striped")),
    "ringattn-blockwise": (_ringattn("blockwise"), ("contiguous",)),
    "ring-attention-pytorch": (_lucidrains, ("contiguous", "striped")),
}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _time_impl(fn, row: dict, layout: str, rank: int, world: int) -> dict:
    """One fwd+bwd of ``fn`` on this rank's shards: times and the local out/grads."""
    q, k, v, do = h.local_inputs(row, rank, world, layout, grad=True)
    m: dict = {}
    h.barrier()
    with h.clock(m):
        out = fn(q, k, v, layout=layout, causal=row["causal"], bucket=row["peer_bucket"])
        out.backward(do)
    return dict(m, out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


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
        q, k, v, _ = (t.transpose(1, 2).contiguous() for t in h.make_inputs(row))  # (b, h, s, d)
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


def _rank(rank: int, world: int, row: dict, plan: list, repeats: int, torch_cp: bool) -> dict:
    """Every rank: each (impl, layout) in ``plan``, then the native-CP attempt."""
    tiny = dict(row, seq=8 * world)
    res = {}
    for impl, layout in plan:
        fn = IMPLS[impl][0]
        _time_impl(fn, tiny, layout, rank, world)  # connects the gloo pairs
        runs = [_time_impl(fn, row, layout, rank, world) for _ in range(repeats)]
        best = min(runs, key=lambda r: r["wall_s"])
        res[(impl, layout)] = dict(best, cpu_s=min(r["cpu_s"] for r in runs))
    res["torch-cp"] = _try_torch_cp(row, world) if torch_cp else None
    return res


def peer_rows(row: dict, res: list[dict], ref: dict, plan: list[tuple[str, str]]) -> list[dict]:
    """One row per (impl, layout): times, errors vs ``ref`` (:func:`harness.sdpa_grads` with
    the SDPA timings) and ratios to ringattn with the same layout."""
    rows = []
    for impl, layout in plan:
        ranks = [r[(impl, layout)] for r in res]
        errs = h.max_errors(ref, ranks, layout, row["world"])
        wrong = [n for n in h.GRADS if errs[n] > FP32_TOL]
        status = "exact" if not wrong else "WRONG " + ", ".join(wrong)
        rows.append(dict(
            row, impl=impl, layout=layout, status=status,
            fwdbwd_s=max(r["wall_s"] for r in ranks), fwdbwd_cpu_s=sum(r["cpu_s"] for r in ranks),
            sdpa_fwdbwd_s=ref["wall_s"], sdpa_fwdbwd_cpu_s=ref["cpu_s"],
            **{f"err_{n}": e for n, e in errs.items()},
        ))  # fmt: skip
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
    notes = [] if torch_cp is None else [("torch native CP", "(its own)", torch_cp)]
    if not lucidrains:
        pip = "pip install --no-deps ring-attention-pytorch einops beartype jaxtyping wadler-lindig"
        notes.append(("ring-attention-pytorch", "-", f"skipped: not installed ({pip})"))
    for impl, module in (("ring-flash-attn", "ring_flash_attn"), ("flash_attn", "flash_attn")):
        have = "installed" if _installed(module) else "not installed"
        if torch.cuda.is_available():
            status = f"skipped: {have}; the CUDA run is not part of this CPU benchmark yet"
        else:
            status = f"skipped: CUDA only, no GPU here ({have})"
        notes.append((impl, "-", status))
    return [dict(row, impl=i, layout=lay, status=st) for i, lay, st in notes]


COLUMNS = output.columns(
    "impl=impl; layout=layout; status=status; fwdbwd_s=f+b wall s:.3f; "
    "fwdbwd_cpu_s=CPU total s:.3f; wall_vs_ringattn=wall / ringattn:.2f; "
    "cpu_vs_ringattn=CPU / ringattn:.2f; cpu_vs_sdpa=CPU / SDPA:.2f; err_out=err out:.1e; "
    "err_dq=err dq:.1e; err_dk=err dk:.1e; err_dv=err dv:.1e",
)

NOTES = (
    "W = {world} gloo ranks on {cores} cores, causal, global seq {seq}, fp32, {heads} heads x "
    "{head_dim}, fwd+bwd. Ratios > 1: slower than ringattn with the same layout. err: max |x - "
    "SDPA| over the whole sequence (exact: all <= {tol:g}). ring-attention-pytorch bucket "
    "{peer_bucket}. Single-process SDPA: {sdpa:.3f} s CPU."
)


def plot(rows: list[dict], path: str) -> None:
    ran = [r for r in rows if r.get("fwdbwd_cpu_s") is not None]
    # break the long package name so neighbouring labels do not overlap
    labels = [f"{r['impl'].replace('-pytorch', chr(10) + 'pytorch')}\n{r['layout']}" for r in ran]
    fig, ax = output.figure(1, figsize=(max(6, 1.4 * len(ran)), 4))
    colors = ["tab:green" if r["status"] == "exact" else "tab:red" for r in ran]
    ax.bar(range(len(ran)), [r["cpu_vs_sdpa"] for r in ran], color=colors)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(ran)), labels, fontsize=7)
    title = f"peers, W={ran[0]['world']}, causal seq {ran[0]['seq']} (green: exact, red: wrong"
    output.style(ax, "", "CPU time / single-process SDPA (fwd+bwd)", title + " gradients)",
                 logy=10, legend=0)  # fmt: skip
    output.save(fig, path, ran)


def main(argv: list[str]) -> int:
    p = h.parser("bench peers", __doc__, out="peers", repeats=2)
    for opt, default in (("--world", 4), ("--seq", 4096), ("--heads", 8), ("--head-dim", 64)):
        p.add_argument(opt, type=h.positive, default=default)
    p.add_argument("--peer-bucket", type=h.positive, default=1024, help="peer tile size")
    p.add_argument("--no-torch-cp", action="store_true", help="skip the native CP attempt")
    # zigzag (every layout runs): seq % 2W == 0
    prob = lambda a: [h.problem_of(a, world=a.world, seq=a.seq, peer_bucket=a.peer_bucket)]
    args = h.parse(p, argv, prob)
    row = args.problems[0]
    torch.set_num_threads(1)
    lucid = _installed("ring_attention_pytorch")
    plan = [(i, lay) for i, (_, lays) in IMPLS.items() for lay in lays]
    plan = [(i, lay) for i, lay in plan if lucid or i != "ring-attention-pytorch"]
    res = h.run_ranks(_rank, args.world, row, plan, args.repeats, not args.no_torch_cp, here=False)
    sdpa = h.sdpa_reference(row, args.repeats)
    ref = dict(h.sdpa_grads(row), wall_s=sdpa["fwdbwd_s"], cpu_s=sdpa["fwdbwd_cpu_s"])
    rows = peer_rows(row, res, ref, plan) + note_rows(row, res[0]["torch-cp"], lucid)
    rows = output.stamp(rows, "peers")
    return output.report(rows, args, [COLUMNS], NOTES, plot, tol=FP32_TOL, sdpa=ref["cpu_s"])
