"""What a run reports: a one-line progress bar on rank 0, a JSON-lines log, a loss plot.

Throughput conventions: ``tokens/s`` counts the global batch; ``TFLOP/s per rank`` is the
model's training FLOPs (``Transformer.flops_per_token`` at the global sequence length,
forward + backward, activation recompute not counted) per second divided by the number of
ranks; MFU divides that by the stated per-rank peak (``train.peak_tflops``). Peak memory is
the CUDA allocator's peak on GPUs and the process's peak resident set size on CPU.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ringattn.memstat import peak_rss_mib

__all__ = ["MetricsLog", "ProgressBar", "peak_memory_mb", "plot_loss"]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank in MiB (CUDA: allocator peak; CPU: process peak RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


class MetricsLog:
    """Appends one JSON object per line to ``path`` (rank 0 only; other ranks pass None)."""

    def __init__(self, path: str | Path | None, start_step: int = 0):
        """Rows up to ``start_step`` steps completed are kept (a resumed run), later ones
        dropped. Every row's ``step`` counts the steps completed when it was written."""
        self.path = Path(path) if path is not None else None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old = self.path.read_text().splitlines() if self.path.exists() else []
        keep = [line for line in old if line and json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, row: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _fmt_row(row: dict, total: int) -> str:
    parts = [f"step {row['step']}/{total}", f"seq {row['seq_len']}", f"loss {row['loss']:.4f}"]
    if row.get("acc") is not None:
        parts.append(f"acc {row['acc']:.2f}")
    parts += [
        f"{row['tokens_per_s']:,.0f} tok/s",
        f"{row['tflops_per_rank']:.4f} TFLOP/s/rank",
        f"MFU {100 * row['mfu']:.1f}%",
        f"mem {row['peak_mem_mb']:,.0f} MiB",
    ]
    return " | ".join(parts)


class ProgressBar:
    """A single ``\\r``-rewritten line on a terminal; plain lines every ``every`` steps when
    the output is a file or a pipe."""

    def __init__(self, total: int, every: int = 10, enabled: bool = True, stream=None):
        self.total, self.every, self.enabled = total, max(1, every), enabled
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, row: dict) -> None:
        if not self.enabled:
            return
        line = _fmt_row(row, self.total)
        if self.tty:
            self.stream.write("\r" + line[:200].ljust(120))
        elif row["step"] % self.every == 0 or row["step"] == self.total:
            self.stream.write(f"{line} | {time.perf_counter() - self.t0:.0f}s\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()


def plot_loss(
    jsonl: str | Path, png: str | Path, title: str = "", chance: float | None = None
) -> Path | None:
    """Training loss per step (and eval accuracy, if logged, with the ``chance`` level) from
    a metrics log, as a PNG. Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_acc" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    for prev, cur in zip(train, train[1:]):  # curriculum stage boundaries
        if cur["seq_len"] != prev["seq_len"]:
            ax.axvline(cur["step"], color="grey", ls=":", lw=0.8)
            ax.text(cur["step"], ax.get_ylim()[1], f" {cur['seq_len']}", va="top", fontsize=8)
    if evals:
        ax2 = ax.twinx()
        ax2.plot(
            [r["step"] for r in evals],
            [r["eval_acc"] for r in evals],
            "o-",
            color="tab:red",
            label="eval accuracy",
        )
        if chance is not None:
            ax2.axhline(chance, color="tab:red", ls="--", lw=0.8, label="chance")
        ax2.set_ylabel("eval accuracy")
        ax2.set_ylim(0, 1.05)
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return Path(png)
