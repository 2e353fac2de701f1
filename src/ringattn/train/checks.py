"""Every check a training config can fail, run in the parent before any rank starts.

``check_config(cfg, world_size)`` raises ``ValueError`` with one line that names the option
(as ``section.key=value``) and the fix. It needs no process group and no tensors, so
``ringattn train`` (and ``--print-config``) reject a bad config at once instead of after the
ranks have started, and every rank runs the same checks again under ``torchrun``.
"""

from __future__ import annotations

import math

from ringattn.train.config import Config

__all__ = ["check_config", "seq_multiple"]


def _fail(option: str, value, problem: str, fix: str) -> ValueError:
    return ValueError(f"{option}={value!r} {problem}; {fix}")


def _at_least(option: str, value, low) -> None:
    if value < low:
        raise _fail(option, value, f"must be >= {low}", f"set --{option} to {low} or more")


def _positivity(cfg: Config) -> None:
    """Counts and sizes that must be positive (or non-negative)."""
    c = cfg
    bounds = [
        ("parallel.dp", c.parallel.dp, 1),
        ("parallel.cp", c.parallel.cp, 1),
        ("parallel.tp", c.parallel.tp, 1),
        ("parallel.ulysses", c.parallel.ulysses, 1),
        ("parallel.threads_per_rank", c.parallel.threads_per_rank, 1),
        ("data.seq_len", c.data.seq_len, 1),
        ("data.batch_size", c.data.batch_size, 1),
        ("data.n_pairs", c.data.n_pairs, 1),
        ("data.n_keys", c.data.n_keys, 1),
        ("data.n_values", c.data.n_values, 1),
        ("data.n_filler", c.data.n_filler, 1),
        ("optim.lr", c.optim.lr, 0.0),
        ("optim.warmup_steps", c.optim.warmup_steps, 0),
        ("optim.weight_decay", c.optim.weight_decay, 0.0),
        ("optim.min_lr_ratio", c.optim.min_lr_ratio, 0.0),
        ("train.steps", c.train.steps, 0),
        ("train.log_every", c.train.log_every, 1),
        ("checkpoint.every", c.checkpoint.every, 0),
        ("checkpoint.keep", c.checkpoint.keep, 0),
        ("eval.every", c.eval.every, 0),
        ("eval.n_seqs", c.eval.n_seqs, 1),
        ("eval.periodic_n_seqs", c.eval.periodic_n_seqs, 0),
        ("eval.seq_len", c.eval.seq_len, 0),
        ("eval.batch_size", c.eval.batch_size, 1),
    ]
    for option, value, low in bounds:
        _at_least(option, value, low)
    for option, value in [
        ("train.peak_tflops", c.train.peak_tflops),
        ("optim.eps", c.optim.eps),
    ]:
        if not value > 0:
            raise _fail(option, value, "must be > 0", f"set --{option} to a positive number")
    for option, value in [
        ("optim.beta1", c.optim.beta1),
        ("optim.beta2", c.optim.beta2),
        ("data.val_fraction", c.data.val_fraction),
    ]:
        if not 0 <= value < 1:
            raise _fail(option, value, "must be in [0, 1)", f"set --{option} to e.g. 0.9")
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden"):
        value = getattr(c.model, name)
        if value is not None:
            _at_least(f"model.{name}", value, 1)
    if c.model.ffn_chunk is not None:
        _at_least("model.ffn_chunk", c.model.ffn_chunk, 1)


def seq_multiple(cfg: Config) -> int:
    """Every sequence length must be a multiple of this: the layout splits it over cp ranks
    (zigzag into 2 * cp chunks) and sequence parallelism splits each rank's part over tp."""
    p = cfg.parallel
    parts = 2 * p.cp if p.layout == "zigzag" else p.cp
    if p.tp > 1 and p.sequence_parallel:
        parts = math.lcm(parts, p.cp * p.tp)
    return parts


def _seq_lengths(cfg: Config) -> list[tuple[str, int]]:
    """(option, length) of every sequence length the run will use."""
    lens = [(f"data.curriculum[{i}] seq_len", st[0]) for i, st in enumerate(cfg.data.curriculum)]
    lens.append(("data.seq_len", cfg.data.seq_len))
    if cfg.eval.seq_len:
        lens.append(("eval.seq_len", cfg.eval.seq_len))
    return lens


def _why(cfg: Config) -> str:
    p = cfg.parallel
    why = f"parallel.cp={p.cp} ranks for parallel.layout={p.layout!r}"
    if p.layout == "zigzag":
        why = f"2 chunks x parallel.cp={p.cp} ranks for parallel.layout='zigzag'"
    if p.tp > 1 and p.sequence_parallel:
        why += f", and cp * tp = {p.cp * p.tp} for sequence parallelism"
    return why


def _check_lengths(cfg: Config) -> None:
    need = seq_multiple(cfg)
    min_len = 0
    if cfg.data.kind == "retrieval":  # RetrievalTask.min_len(): needles, queries, answers
        min_len = ((1 if cfg.data.needle == "token" else 3) + 3) * cfg.data.n_pairs + 1
    for option, s in _seq_lengths(cfg):
        if s % need:
            up = need * max(1, round(s / need))
            raise _fail(
                option,
                s,
                f"is not divisible by {need} ({_why(cfg)})",
                f"use e.g. {up}, or change parallel.cp",
            )
        if s < min_len:
            raise _fail(
                option,
                s,
                f"is too short for {cfg.data.n_pairs} needles (data.n_pairs)",
                f"use at least {min_len} or fewer data.n_pairs",
            )


def _check_batches(cfg: Config) -> None:
    dp = cfg.parallel.dp
    sizes = [
        (f"data.curriculum[{i}] batch_size", st[1]) for i, st in enumerate(cfg.data.curriculum)
    ]
    sizes += [("data.batch_size", cfg.data.batch_size), ("eval.batch_size", cfg.eval.batch_size)]
    for option, b in sizes:
        if b % dp:
            raise _fail(
                option, b, f"is not divisible by parallel.dp={dp}", "each dp rank takes B / dp rows"
            )
    e = cfg.eval
    for name in ("n_seqs", "periodic_n_seqs"):
        if getattr(e, name) % e.batch_size:
            raise _fail(
                f"eval.{name}",
                getattr(e, name),
                f"is not a multiple of eval.batch_size={e.batch_size}",
                "change either",
            )


def _check_heads(cfg: Config) -> None:
    from ringattn.parallel.tp import check_tp

    p, m = cfg.parallel, cfg.model.build()
    if m.dim % m.n_heads or (m.dim // m.n_heads) % 2:
        raise _fail(
            "model.dim",
            m.dim,
            f"must be an even multiple of n_heads={m.n_heads}",
            "RoPE rotates pairs of the head dimension; change model.dim or n_heads",
        )
    if m.n_heads % m.kv_heads:
        raise _fail(
            "model.n_kv_heads",
            m.kv_heads,
            f"must divide n_heads={m.n_heads}",
            "each kv head serves n_heads / n_kv_heads query heads",
        )
    check_tp(m, p.tp, p.sequence_parallel)
    heads = m.n_heads // p.tp
    if p.strategy == "ulysses" and heads % p.cp:
        raise _fail(
            "parallel.cp",
            p.cp,
            f"must divide the heads per tp rank ({heads}) for parallel.strategy='ulysses'",
            "use a divisor of them or another strategy",
        )
    if p.strategy == "hybrid":
        if p.ulysses < 2 or p.cp % p.ulysses or heads % p.ulysses:
            raise _fail(
                "parallel.ulysses",
                p.ulysses,
                f"must be > 1 and divide both "
                f"parallel.cp={p.cp} and the heads per tp rank ({heads}) for "
                "parallel.strategy='hybrid'",
                "pick such a divisor",
            )


def _check_packed(cfg: Config) -> None:
    """Layout "packed" is built from each row's documents: it needs packed documents."""
    d = cfg.data
    if cfg.parallel.layout == "packed" and (d.kind != "text" or d.cross_doc_attention):
        raise _fail(
            "parallel.layout",
            "packed",
            "balances packed documents (cu_seqlens), but "
            f"data.kind={d.kind!r} with data.cross_doc_attention="
            f"{str(d.cross_doc_attention).lower()} has none",
            "use data.kind='text' with data.cross_doc_attention=false, or parallel.layout='zigzag'",
        )


def check_config(cfg: Config, world_size: int | None = None) -> None:
    """Raise ValueError (one line: option, problem, fix) unless ``cfg`` can run; with
    ``world_size``, also unless dp * cp * tp equals it (the launched ranks)."""
    _positivity(cfg)
    p = cfg.parallel
    if world_size is not None:
        from ringattn.parallel.dims import ParallelDims

        ParallelDims(p.dp, p.cp, p.tp).check_world(world_size)  # names the options
    _check_heads(cfg)
    _check_packed(cfg)
    _check_lengths(cfg)
    _check_batches(cfg)
    if cfg.data.kind == "retrieval":  # its token ids must fit the vocabulary
        from ringattn.train.data import build_dataset

        build_dataset(cfg.data, cfg.model.build().vocab_size)
