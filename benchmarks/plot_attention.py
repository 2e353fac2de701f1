"""Plot `ringattn bench attention --out X.jsonl` rows: fwd+bwd CPU-time ratio vs SDPA and
achieved TFLOP/s per rank, one bar per (W, layout, causal, dtype).

    python benchmarks/plot_attention.py bench.jsonl --png docs/img/attention.png
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("jsonl")
    p.add_argument("--png", default="attention.png")
    a = p.parse_args()
    rows = [json.loads(line) for line in open(a.jsonl) if line.strip()]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"W{r['world']} {r['strategy']}\n{r['layout'][:6]} {'c' if r['causal'] else 'f'} "
        f"{r['dtype']} {r['seq'] // 1024}K"
        for r in rows
    ]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.6 * len(rows)), 7), sharex=True)
    axes[0].bar(range(len(rows)), [r.get("cpu_ratio_fwdbwd", 0) for r in rows])
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel("ring CPU time / SDPA (fwd+bwd)")
    axes[1].bar(range(len(rows)), [r["tflops_fwdbwd_per_rank"] for r in rows])
    axes[1].set_ylabel("TFLOP/s per rank (fwd+bwd)")
    axes[1].set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(a.png, dpi=120)
    print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
