"""Training runs for the parity tests: a plain single-process reference and the functions
the worker ranks run (module level, so they pickle by reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ringattn
from ringattn.model import Transformer
from ringattn.parallel.cp import CPAttention
from ringattn.train.config import Config
from ringattn.train.data import IGNORE, build_dataset, stage_at
from ringattn.train.optim import build_optimizer, lr_at


def tiny_config(tmp: str, **sections) -> dict:
    """A config dict for a few fast steps of the tiny model; ``sections`` override it."""
    base = {
        "model": {"preset": "tiny"},
        "data": {"kind": "retrieval", "seq_len": 64, "batch_size": 4, "n_pairs": 3},
        # eps 1e-6: AdamW divides each gradient element by its own RMS, so an element whose
        # gradient is at rounding-noise level (~1e-10) would take a full lr-sized step of
        # either sign; a larger eps keeps such updates linear in the gradient, and the
        # parameter comparison meaningful at fp32 tolerance.
        "optim": {"lr": 3e-3, "warmup_steps": 2, "grad_clip": 0.5, "eps": 1e-6},
        "train": {"steps": 3, "out_dir": tmp, "progress": False, "plot": False},
        "eval": {"n_seqs": 4, "batch_size": 4, "seq_len": 64},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return base


def reference_run(cfg_dict: dict) -> dict:
    """The same training without any parallelism: one process, plain model, token-mean loss,
    ``torch.nn.utils.clip_grad_norm_``. Returns per-step losses and the final parameters."""
    cfg = Config.from_dict(cfg_dict)
    model = Transformer(cfg.model.build())
    model.init_weights(cfg.train.seed)
    attn = CPAttention(cp=1)  # local attention; per-document when the batch is packed
    model.set_attention(attn)
    opt = build_optimizer(model, cfg.optim)
    data = build_dataset(cfg.data, model.cfg.vocab_size)
    losses = []
    for step in range(cfg.train.steps):
        seq_len, batch_size = stage_at(cfg.data, step)
        batch = data.batch(step, batch_size, seq_len)
        attn.cu_seqlens = batch.cu_seqlens
        pos = None
        if batch.cu_seqlens is not None:
            pos = torch.stack(
                [
                    ringattn.positions(seq_len, "contiguous", rank=0, world_size=1, cu_seqlens=c)
                    for c in batch.cu_seqlens
                ]
            )
        logits = model(batch.tokens, pos)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.optim, cfg.train.steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "params": params}


def fit_case(cfg_dict: dict) -> dict | None:
    """Every rank: build the Trainer, fit; rank 0 returns the summary and full parameters."""
    import torch.distributed as dist

    from ringattn.train.trainer import Trainer

    trainer = Trainer(Config.from_dict(cfg_dict))
    summary = trainer.fit()
    params = trainer.full_params()  # collective
    if dist.get_rank() != 0:
        return None
    return {**summary, "params": params, "start_step": summary["steps"] - len(summary["losses"])}


def memory_case(cfg_dict: dict) -> float:
    """Saved-activation MiB on this rank for one forward + backward at ``data.seq_len``."""
    from ringattn.train.memory import measure_step
    from ringattn.train.trainer import Trainer

    cfg = Config.from_dict(cfg_dict)
    trainer = Trainer(cfg)
    batch = trainer.data.batch(0, cfg.data.batch_size, cfg.data.seq_len)
    return measure_step(trainer, batch)["saved_mib"]
