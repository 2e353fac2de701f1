"""The training loop: build the mesh and the parallel model, step, evaluate, checkpoint.

Runs on every rank of an initialised process group (``ringattn.launch`` or ``torchrun``).
One step, for a global batch ``(B, S)`` that every rank builds identically:

1. keep rows ``[dp_rank * B/dp, ...)``, then this cp rank's tokens, labels and positions
   under the layout (labels were shifted on the global sequence);
2. forward; ``loss_sum`` = sum of token cross-entropies here; divide by the GLOBAL number
   of target tokens (known from the global batch, no communication) and backward;
   FSDP sums gradients over dp_cp, which gives exactly the gradient of the token-weighted
   global mean;
3. clip the global gradient norm, set the scheduled lr, AdamW step;
4. all-reduce (loss_sum, correct) over dp_cp for the log.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from ringattn.model import Transformer
from ringattn.parallel import (
    ParallelDims,
    apply_ac,
    apply_cp,
    apply_fsdp,
    apply_tp,
    init_local_shards,
    shard_batch,
)
from ringattn.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ringattn.train.checks import check_config
from ringattn.train.config import Config
from ringattn.train.data import IGNORE, Batch, build_dataset, stage_at
from ringattn.train.metrics import MetricsLog, ProgressBar, peak_memory_mb, plot_loss
from ringattn.train.optim import build_optimizer, clip_grad_norm, lr_at

__all__ = ["Trainer", "build_parallel_model", "resolve_device"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype ``train.dtype`` computes in on ``device``: bf16 on a CPU without bf16 matrix
    units (emulated, ~50-250x slower than fp32 there) computes in fp32 instead."""
    from ringattn.kernels.fused import cpu_half_is_native

    dtype = _DTYPES[name]
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_half_is_native():
        return torch.float32
    return dtype


def build_parallel_model(cfg: Config, mesh, device: torch.device, init: str = "meta"):
    """The model built on the ``meta`` device, then, in order: TP, CP, AC, FSDP; then each
    rank allocates and initialises its own shards only (:func:`init_local_shards`), with
    values that do not depend on the layout. Returns ``(model, cp_attention)``.

    ``init="eager"`` builds and initialises the full model on ``device`` first (every rank
    holds a full copy until FSDP shards it: the old path, kept to compare with);
    ``init="shapes"`` leaves the parallel model on ``meta`` (shard shapes, no storage), for
    measuring models larger than the machine.
    """
    if init not in ("meta", "eager", "shapes"):
        raise ValueError(f"init must be meta | eager | shapes, got {init!r}")
    mcfg = cfg.model.build()
    with torch.device(device if init == "eager" else "meta"):
        model = Transformer(mcfg)
    if init == "eager":
        model.init_weights(cfg.train.seed)
    apply_tp(model, mesh["tp"], sequence_parallel=cfg.parallel.sequence_parallel)
    attn = apply_cp(
        model,
        mesh["cp"],
        layout=cfg.parallel.layout,
        strategy=cfg.parallel.strategy,
        kernel=cfg.parallel.kernel,
        grad_precision=cfg.parallel.grad_precision,
        hybrid_mesh=mesh.hybrid,
    )
    apply_ac(model, cfg.parallel.ac)
    apply_fsdp(model, mesh["dp_cp"], param_dtype=compute_dtype(cfg.train.dtype, device))
    if init == "meta":
        init_local_shards(model, device, cfg.train.seed)
    # With sequence parallelism the logits come out of DTensor.to_local(), a view; FSDP
    # warns in case someone modifies them in place. The trainer never does.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    return model, attn


class Trainer:
    """Everything one rank needs; see the module docstring for one step."""

    def __init__(self, cfg: Config):
        check_config(cfg, dist.get_world_size())  # as the parent did, plus the world size
        self.cfg = cfg
        self.rank = dist.get_rank()
        self.device = resolve_device(cfg.parallel.device)
        p = cfg.parallel
        ulysses = p.ulysses if p.strategy == "hybrid" else 1
        self.dims = ParallelDims(p.dp, p.cp, p.tp, ulysses)
        self.mesh = self.dims.build_mesh(self.device.type)
        self.dp_rank = self.mesh["dp"].get_local_rank()
        self.cp_rank = self.mesh["cp"].get_local_rank()
        self.group = self.mesh["dp_cp"].get_group()  # ranks holding different tokens
        self.model, self.attn = build_parallel_model(cfg, self.mesh, self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.data = build_dataset(cfg.data, self.model.cfg.vocab_size)
        self.step = 0
        self.ckpt_dir = Path(cfg.checkpoint.dir or Path(cfg.train.out_dir) / "checkpoints")
        if cfg.checkpoint.enabled and cfg.checkpoint.resume:
            self.resume()

    # -------------------------------------------------------------------------- one step

    def _local(self, batch: Batch):
        """This rank's (tokens, labels, positions) of a global batch; sets cu_seqlens."""
        per = batch.tokens.shape[0] // self.dims.dp
        part = batch.rows(self.dp_rank * per, (self.dp_rank + 1) * per)
        tokens, labels, pos = shard_batch(
            part.tokens,
            part.labels,
            layout=self.cfg.parallel.layout,
            cp_rank=self.cp_rank,
            cp=self.dims.cp,
            cu_seqlens=part.cu_seqlens,
        )
        self.attn.cu_seqlens = part.cu_seqlens
        dev = self.device
        return tokens.to(dev), labels.to(dev), pos.to(dev)

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token losses, number correct) on this rank; the first carries the graph."""
        tokens, labels, pos = self._local(batch)
        logits = self.model(tokens, pos).float()  # (b, s_local, vocab)
        loss_sum = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        # a masked sum, not boolean indexing: indexing sizes its output from the mask's
        # values, a host sync per step
        correct = ((logits.argmax(-1) == labels) & (labels != IGNORE)).sum()
        return loss_sum, correct

    def _reduce(self, *values) -> list[float]:
        # made on the collective's device (NCCL takes no CPU tensors)
        t = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values]
        )
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def train_step(self, step: int) -> dict:
        c = self.cfg
        t0 = time.perf_counter()
        seq_len, batch_size = stage_at(c.data, step)
        batch = self.data.batch(step, batch_size, seq_len)
        n_targets = max(1, batch.n_targets)  # global: every rank holds the global batch
        loss_sum, correct = self._loss(batch)
        (loss_sum / n_targets).backward()  # FSDP sums over dp_cp -> grad of the global mean
        grad_norm = clip_grad_norm(self.model.parameters(), c.optim.grad_clip)
        lr = lr_at(step, c.optim, c.train.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, total_correct = self._reduce(loss_sum.detach(), correct)
        dt = time.perf_counter() - t0
        return self._row(
            step, seq_len, batch_size, n_targets, total_loss, total_correct, lr, grad_norm, dt
        )

    def _row(self, step, seq_len, batch_size, n_targets, loss, correct, lr, grad_norm, dt):
        tokens = seq_len * batch_size
        flops = self.model.flops_per_token(seq_len) * tokens / dt / self.dims.world_size / 1e12
        return {
            "step": step + 1,  # steps completed, as the console counts them
            "seq_len": seq_len,
            "batch_size": batch_size,
            "loss": loss / n_targets,
            "acc": correct / n_targets,
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time_s": dt,
            "tokens_per_s": tokens / dt,
            "tflops_per_rank": flops,
            "mfu": flops / self.cfg.train.peak_tflops,
            "peak_mem_mb": peak_memory_mb(self.device),
        }

    # -------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, n_seqs: int | None = None) -> dict:
        """Loss and accuracy over ``n_seqs`` (default ``eval.n_seqs``) held-out sequences at
        ``eval.seq_len`` (retrieval: accuracy of the queried values; text: next-byte)."""
        e = self.cfg.eval
        seq_len = e.seq_len or self.cfg.data.seq_len
        loss, correct, n = 0.0, 0.0, 0
        t0 = time.perf_counter()
        for batch in self.data.eval_batches(n_seqs or e.n_seqs, e.batch_size, seq_len, e.seed):
            l_sum, c = self._loss(batch)  # summed on the device: no host sync per batch
            loss, correct, n = loss + l_sum.double(), correct + c, n + batch.n_targets
        loss, correct = self._reduce(loss, correct)
        return {
            "step": self.step,  # steps completed, as in training rows
            "eval_seq_len": seq_len,
            "eval_targets": n,
            "eval_loss": loss / max(n, 1),
            "eval_acc": correct / max(n, 1),
            "eval_time_s": time.perf_counter() - t0,
        }

    # -------------------------------------------------------------------------- checkpoints

    def save(self) -> Path:
        extra = {"config": self.cfg.to_dict(), "dims": list(vars(self.dims).values())}
        return save_checkpoint(
            self.ckpt_dir, self.step, self.model, self.optimizer, extra, self.cfg.checkpoint.keep
        )

    def resume(self) -> bool:
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            return False
        info = load_checkpoint(path, self.model, self.optimizer)
        self.step = int(info["step"])
        return True

    # -------------------------------------------------------------------------- the loop

    def fit(self) -> dict:
        """Train to ``train.steps``; returns a summary (the same on every rank). A run
        resumed at or past ``train.steps`` does nothing: no training, eval or checkpoint, and
        its log is left as it was (``summary["nothing_to_do"]``)."""
        c = self.cfg
        if self.step >= c.train.steps:
            return self._nothing_to_do()
        out = Path(c.train.out_dir)
        lead = self.rank == 0
        log = MetricsLog(out / "metrics.jsonl" if lead else None, start_step=self.step)
        if lead:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(c.to_dict(), indent=1))
        bar = ProgressBar(c.train.steps, c.train.log_every, enabled=lead and c.train.progress)
        if self.step:
            bar.message(f"resumed from step {self.step} ({self.ckpt_dir})")
        t0, rows, evals = time.perf_counter(), [], []
        while self.step < c.train.steps:
            row = self.train_step(self.step)
            self.step += 1
            rows.append(row)
            log.write(row)
            bar.update(row)
            if c.eval.every and self.step % c.eval.every == 0 and self.step < c.train.steps:
                evals.append(self._eval_and_log(log, bar, c.eval.periodic_n_seqs))
            if c.checkpoint.enabled and c.checkpoint.every and self.step % c.checkpoint.every == 0:
                self.save()
        evals.append(self._eval_and_log(log, bar))
        if c.checkpoint.enabled and (not c.checkpoint.every or self.step % c.checkpoint.every):
            self.save()
        return self._summary(rows, evals, time.perf_counter() - t0, log)

    def _eval_and_log(self, log: MetricsLog, bar: ProgressBar, n_seqs: int = 0) -> dict:
        ev = self.evaluate(n_seqs or None)
        log.write(ev)
        bar.message(
            f"eval after step {ev['step']}: seq {ev['eval_seq_len']}, "
            f"loss {ev['eval_loss']:.4f}, accuracy {ev['eval_acc']:.3f} "
            f"over {ev['eval_targets']} targets"
        )
        return ev

    def _nothing_to_do(self) -> dict:
        return {
            "steps": self.step,
            "losses": [],
            "nothing_to_do": True,
            "checkpoint": str(latest_checkpoint(self.ckpt_dir) or ""),
        }

    def _summary(self, rows: list[dict], evals: list[dict], elapsed: float, log) -> dict:
        peaks = [None] * self.dims.world_size
        dist.all_gather_object(peaks, peak_memory_mb(self.device))
        png = None
        if log.path is not None and self.cfg.train.plot and log.path.exists():
            d = self.dims
            png = plot_loss(
                log.path,
                log.path.with_name("loss_curve.png"),
                title=f"{self.cfg.data.kind}: dp={d.dp} cp={d.cp} tp={d.tp}",
                chance=getattr(self.data, "chance", None),
            )
        return {
            "steps": self.step,
            "losses": [r["loss"] for r in rows],
            "final_loss": rows[-1]["loss"] if rows else None,
            "eval": evals[-1] if evals else None,
            "train_time_s": elapsed,
            "peak_mem_mb_per_rank": peaks,
            "metrics": str(log.path) if log.path else None,
            "loss_curve": str(png) if png else None,
        }

    def full_params(self) -> dict[str, torch.Tensor]:
        """Every parameter, unsharded, on CPU (collective; for tests and exports)."""
        out = {}
        for name, p in self.model.named_parameters():
            t = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = t.detach().cpu().clone()
        return out
