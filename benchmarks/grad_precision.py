"""Error of ring attention's two half-precision backward modes against the float64 oracle,
next to a naive bf16 implementation's error, at W = 2, 4, 8 (docs/precision.md).

    python benchmarks/grad_precision.py --world 2 4 8 --seq 1024 --seeds 3 --out precision.jsonl

"exact" runs each block's backward in fp32; "fast" in bf16 (forced onto the CPU op's native
bf16 path, as on a CPU with bf16 units or a GPU, whatever this CPU has), block gradients
summed in fp32. "naive" is explicit softmax(q k^T) v attention computed in bf16 by autograd,
the baseline of flash-attn's rule (at most 2x its error). Errors are max |x - ref| / max |ref|.
"""

from __future__ import annotations

import argparse
import json

import torch

from ringattn import ring_attention, shard
from ringattn.bench.harness import run_ranks
from ringattn.kernels import fused
from ringattn.layouts import permutation

FIELDS = ("out", "dq", "dk", "dv")


def inputs(args, seed: int):
    g = torch.Generator().manual_seed(seed)
    b, s, h, d = 1, args.seq, args.heads, args.head_dim
    return [torch.randn(b, s, h, d, generator=g).bfloat16() for _ in range(4)]  # q k v dout


def naive(q, k, v, dout, dtype):
    """out and grads of explicit causal attention computed in ``dtype``; (b, s, h, d)."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    s = (qt @ kt.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    out = (torch.softmax(s, dim=-1) @ vt).transpose(1, 2)
    out.backward(dout.to(dtype))
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def rank_errors(rank, world, args, seed, precision):
    """This rank's zigzag shards through the ring; returns its out and grads."""
    q, k, v, dout = (shard(t, "zigzag", rank=rank, world_size=world) for t in inputs(args, seed))
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    saved = fused.cpu_half_is_native
    fused.cpu_half_is_native = lambda: True  # "fast": real bf16 block backward on any CPU
    try:
        out = ring_attention(q, k, v, causal=True, layout="zigzag", grad_precision=precision)
        out.backward(dout)
    finally:
        fused.cpu_half_is_native = saved
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def rel_err(x, ref) -> float:
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", help="JSON lines file (default: stdout only)")
    args = p.parse_args(argv)
    rows = []
    for seed in range(args.seeds):
        q, k, v, dout = inputs(args, seed)
        ref = naive(q, k, v, dout, torch.float64)
        base = {n: rel_err(t, ref[n]) for n, t in naive(q, k, v, dout, torch.bfloat16).items()}
        for world in args.world:
            if args.seq % (2 * world):
                raise SystemExit(f"--seq {args.seq} is not divisible by 2 x --world {world}")
            for precision in ("exact", "fast"):
                per_rank = run_ranks(rank_errors, world, args, seed, precision)
                back = torch.argsort(permutation(args.seq, "zigzag", world))  # to global order
                got = {n: torch.cat([r[n] for r in per_rank], 1)[:, back] for n in FIELDS}
                row = dict(world=world, seed=seed, seq=args.seq, grad_precision=precision)
                for n in FIELDS:
                    row[f"err_{n}"] = rel_err(got[n], ref[n])
                    row[f"naive_{n}"] = base[n]
                    row[f"x_naive_{n}"] = row[f"err_{n}"] / base[n]
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print("\n| W | mode | dq / naive | dk / naive | dv / naive | out / naive |")
    print("|---|---|---|---|---|---|")
    for world in args.world:
        for precision in ("exact", "fast"):
            sel = [r for r in rows if r["world"] == world and r["grad_precision"] == precision]
            worst = {n: max(r[f"x_naive_{n}"] for r in sel) for n in FIELDS}
            cells = " | ".join(f"{worst[n]:.2f}x" for n in ("dq", "dk", "dv", "out"))
            print(f"| {world} | {precision} | {cells} |")


if __name__ == "__main__":
    main()
