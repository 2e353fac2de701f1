"""``make gpu-check`` / ``ringattn check --device cuda``: one command for whoever has GPUs.

On W = 1-8 GPUs of one node (NCCL, through PyTorch's elastic launcher, or as is under
``torchrun --nproc-per-node=W -m ringattn.bench.gpu_check``), three parts, one table:

1. oracle grid: ring / allgather / ulysses x bf16 / fp16 / fp32 x document / window mask
   (both causal, GQA 16:8 heads) x head_dim 64 / 128 against float64 naive attention on the
   whole sequence; a low-precision result passes when its error is at most 2x that of naive
   attention computed in the same dtype (flash-attn's rule), + 1e-4;
2. timing: ring fwd+bwd (zigzag, causal, bf16) vs single-GPU SDPA on the same global
   problem: ratio, TFLOP/s per GPU, and exposed communication, estimated as
   ``t_ring - t_sdpa / W`` (the ring's time beyond perfectly parallel compute: it also
   counts block-kernel overhead, so it is an upper bound);
3. two trainer steps at ``llama-3b`` shapes with cp = W (bf16, full AC, FSDP).

Without CUDA it prints one line saying why and exits 0. ``--device cpu`` runs the same three
parts on gloo ranks at a tiny size (the test suite does): only the sizes differ.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from ..launch import init_distributed, launch, under_torchrun

STRATEGIES = ("ring", "allgather", "ulysses")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MASKS = ("document", "window")
HEAD_DIMS = (64, 128)
HEADS, KV_HEADS = 16, 8  # GQA; ulysses needs both divisible by W (W = 1, 2, 4, 8)
# per device: (grid seq, timing seq, timing heads, timing head_dim, trainer preset, seq)
SIZES = {
    "cuda": dict(grid_seq=4096, time_seq=65536, time_heads=32, trainer="llama-3b", train_seq=8192),
    "cpu": dict(grid_seq=256, time_seq=2048, time_heads=4, trainer="tiny", train_seq=256),
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ringattn check --device", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--world", type=int, default=0, help="ranks (default: all GPUs; CPU: 2)")
    return p.parse_args(argv)


def skip_reason(device: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return (
            f"gpu-check skipped: no CUDA device (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); nothing was run"
        )
    return None


# ---------------------------------------------------------------------------- 1. oracle grid


def _reference(q, k, v, do, mask):
    """Naive attention on the whole sequence, [out, dq, dk, dv], computed in float64 (the
    oracle) and in q's dtype (the naive baseline the tolerance is relative to).
    q (b, s, h, d), k/v (b, s, hk, d), mask (s, s) bool: True = may attend."""

    def run(dtype):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        rep = q.shape[2] // k.shape[2]
        qt = qq.transpose(1, 2)  # (b, h, s, d)
        kt, vt = (t.transpose(1, 2).repeat_interleave(rep, 1) for t in (kk, vv))
        s = (qt @ kt.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (b, h, s, s)
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
        out = (p @ vt).transpose(1, 2)  # (b, s, h, d)
        out.backward(do.to(dtype))
        return [out.detach(), qq.grad, kk.grad, vv.grad]

    return run(torch.float64), run(q.dtype)


def _mask(kind: str, s: int, device) -> tuple[torch.Tensor, dict]:
    """(allowed (s, s) bool, keyword arguments of the API) for a causal document/window mask."""
    pos = torch.arange(s, device=device)
    allowed = pos[None, :] <= pos[:, None]
    if kind == "document":
        cu = torch.tensor([0, s // 8, s // 2 + 16, s], dtype=torch.int32)
        doc = torch.bucketize(pos, cu[1:-1].to(device), right=True)
        return allowed & (doc[:, None] == doc[None, :]), {"cu_seqlens": cu}
    left = s // 8
    return allowed & (pos[None, :] >= pos[:, None] - left), {"window": (left, 0)}


def _rel(x, ref) -> float:
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def grid_case(strategy, dtype, mask_kind, head_dim, s, rank, world, device) -> dict | None:
    """One grid cell on every rank; rank 0 returns its row."""
    from .. import context_parallel_attention, shard, unshard

    g = torch.Generator().manual_seed(head_dim * 7 + len(mask_kind))
    q, k, v, do = (
        torch.randn(1, s, n, head_dim, generator=g).to(device, DTYPES[dtype])
        for n in (HEADS, KV_HEADS, KV_HEADS, HEADS)
    )
    allowed, kw = _mask(mask_kind, s, device)
    layout = "contiguous" if strategy == "ulysses" else "zigzag"
    loc = [
        shard(t, layout, rank=rank, world_size=world).detach().requires_grad_() for t in (q, k, v)
    ]
    out = context_parallel_attention(*loc, strategy=strategy, causal=True, layout=layout, **kw)
    out.backward(shard(do, layout, rank=rank, world_size=world))
    got = [unshard(t.detach(), layout) for t in (out, *(x.grad for x in loc))]
    if rank:
        return None
    ref, naive = _reference(q, k, v, do, allowed)
    errs = [_rel(x, r) for x, r in zip(got, ref, strict=True)]
    bounds = [2 * _rel(n, r) + 1e-4 for n, r in zip(naive, ref, strict=True)]
    ok = all(e <= b for e, b in zip(errs, bounds, strict=True))
    worst = max(range(4), key=lambda i: errs[i] / bounds[i])
    detail = f"worst {('out', 'dq', 'dk', 'dv')[worst]} err {errs[worst]:.1e}"
    return dict(part="oracle", case=f"{strategy} {dtype} {mask_kind} d{head_dim}", ok=ok,
                detail=f"{detail} (bound {bounds[worst]:.1e})")  # fmt: skip


# ---------------------------------------------------------------------------- 2. timing


def _clock(fn, device, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` after one warm-up; synchronises the device around each."""
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timing_case(size: dict, rank: int, world: int, device) -> dict | None:
    import torch.nn.functional as F

    from .. import ring_attention, shard

    s, h, d = size["time_seq"], size["time_heads"], 128
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, s, n, d, generator=g).to(device, dtype) for n in (h, h // 4, h // 4))
    loc = [shard(t, "zigzag", rank=rank, world_size=world).requires_grad_() for t in (q, k, v)]

    def ring():
        ring_attention(*loc, causal=True, layout="zigzag").sum().backward()

    t_ring = _clock(ring, device)
    dist.barrier()
    t_one = None
    if rank == 0:  # the whole problem on one device: SDPA (flash backend on GPUs)
        full = [t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v)]  # (b, h, s, d)

        def one():
            F.scaled_dot_product_attention(*full, is_causal=True, enable_gqa=True).sum().backward()

        t_one = _clock(one, device)
    dist.barrier()
    times = [None] * world
    dist.all_gather_object(times, t_ring)
    if rank:
        return None
    t_ring = max(times)  # the slowest rank sets the step
    flops = 3.5 * 4 * s * s * h * d / 2  # causal fwd (4 s^2 h d / 2) + bwd (2.5x)
    exposed = max(0.0, t_ring - t_one / world)
    return dict(part="timing", case=f"ring fwd+bwd W={world} s={s} h={h} d={d} {dtype}",
                ok=True, detail=f"ring {t_ring * 1e3:.1f} ms vs 1-device SDPA "
                f"{t_one * 1e3:.1f} ms (ratio {t_ring / t_one:.2f}); "
                f"{flops / t_ring / world / 1e12:.2f} TFLOP/s per device; exposed comm <= "
                f"{exposed * 1e3:.1f} ms ({exposed / t_ring:.0%})")  # fmt: skip


# ---------------------------------------------------------------------------- 3. trainer


def trainer_case(size: dict, world: int, device) -> dict | None:
    from ..train.config import Config
    from ..train.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config.from_dict({
            "model": {"preset": size["trainer"]},
            "parallel": {"cp": world, "ac": "full", "device": device.type},
            "data": {"kind": "retrieval", "seq_len": size["train_seq"], "batch_size": 1},
            "train": {"steps": 2, "dtype": "bf16", "out_dir": tmp, "progress": False,
                      "plot": False},
        })  # fmt: skip
        trainer = Trainer(cfg)
        rows = [trainer.train_step(i) for i in range(2)]
    if dist.get_rank():
        return None
    losses = ", ".join(f"{r['loss']:.3f}" for r in rows)
    ok = all(r["loss"] == r["loss"] for r in rows)  # finite, not NaN
    return dict(part="trainer", case=f"{size['trainer']} cp={world} seq={size['train_seq']}",
                ok=ok, detail=f"losses {losses}; step 2 {rows[1]['step_time_s']:.2f} s, "
                f"{rows[1]['tflops_per_rank']:.1f} TFLOP/s per rank, peak "
                f"{rows[1]['peak_mem_mb']:.0f} MB")  # fmt: skip


# ---------------------------------------------------------------------------- driver


def _cell(fn, *args) -> dict | None:
    """One part; an exception becomes a failed row rather than a lost table (the group may
    be unusable after it, so the remaining parts may fail too: each says so)."""
    try:
        return fn(*args)
    except Exception as e:  # reported in the table
        name = getattr(fn, "__name__", "case").removesuffix("_case")
        return dict(part=name, case=" ".join(map(str, args[:4])), ok=False,
                    detail=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")  # fmt: skip


def sizes(device_type: str, world: int) -> dict:
    """The sizes for ``device_type``, every sequence rounded up to a multiple of 2W (the
    zigzag layout's chunks), so any W from 1 to 8 works."""
    step = 2 * world
    return {k: -(-v // step) * step if k.endswith("seq") else v
            for k, v in SIZES[device_type].items()}  # fmt: skip


def run_rank(device_kind: str) -> list[dict] | None:
    """Every rank: the three parts; rank 0 returns the rows."""
    rank, world, device = init_distributed(device=device_kind, threads=1)
    size = sizes(device.type, world)
    rows = []
    for strategy in STRATEGIES:
        for dtype in DTYPES:
            for mask in MASKS:
                for hd in HEAD_DIMS:
                    case = f"{strategy} {dtype} {mask} d{hd}"
                    if strategy == "ulysses" and (HEADS % world or KV_HEADS % world):
                        why = f"skipped: ulysses needs {HEADS} and {KV_HEADS} heads % W == 0"
                        rows.append(dict(part="oracle", case=case, ok=True, detail=why))
                        continue
                    args = (strategy, dtype, mask, hd, size["grid_seq"], rank, world, device)
                    rows.append(_cell(grid_case, *args))
    rows.append(_cell(timing_case, size, rank, world, device))
    rows.append(_cell(trainer_case, size, world, device))
    return rows if rank == 0 else None


def format_table(rows: list[dict], world: int, device: str, seconds: float) -> str:
    w = max(len(r["case"]) for r in rows)
    lines = [f"ringattn gpu-check: {world} x {device}, {seconds:.0f} s", ""]
    lines.append(f"{'part':8} {'case':{w}} {'ok':4} detail")
    lines += [f"{r['part']:8} {r['case']:{w}} {'OK' if r['ok'] else 'FAIL':4} {r['detail']}"
              for r in rows]  # fmt: skip
    n_bad = sum(not r["ok"] for r in rows)
    lines.append(f"\n{len(rows) - n_bad}/{len(rows)} OK")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    a = parse(argv)
    if (why := skip_reason(a.device)) is not None:
        print(why)
        return 0
    t0 = time.perf_counter()
    if under_torchrun():
        rows = run_rank(a.device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
    else:
        world = a.world or (torch.cuda.device_count() if a.device == "cuda" else 2)
        rows = launch(run_rank, world, a.device)[0]
    if rows is None:  # a torchrun rank other than 0
        return 0
    rows = [r for r in rows if r is not None]
    print(format_table(rows, world, a.device, time.perf_counter() - t0))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
