"""Fine-tune a local Hugging Face causal LM at long context: FSDP2 over dp x cp, context
parallel attention through transformers' AttentionInterface, DCP checkpoints.

    # a checkpoint directory (config.json + safetensors), 4 ranks: 2 data x 2 context parallel
    torchrun --standalone --nproc-per-node=4 examples/hf_finetune.py \\
        --model-dir /path/to/Llama-3.2-1B --dp 2 --cp 2 --seq-len 32768 --steps 100 \\
        --ckpt-dir runs/hf --save-hf runs/hf/final
    # CPU smoke run: a random tiny Llama, synthetic packed documents
    torchrun --standalone --nproc-per-node=2 examples/hf_finetune.py --tiny --cp 2 --steps 2

Data: ``--data tokens.pt`` (a 1-D LongTensor of token ids, split into documents at
``--eos-id``), else synthetic packed documents (each one an arithmetic sequence mod the
vocabulary, so the loss visibly falls). Batches are a function of (step, dp rank): a resumed
run sees the same data as an uninterrupted one. Restarting with the same ``--ckpt-dir``
resumes from its newest complete checkpoint, with any dp / cp degrees.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ringattn.integrations import hf
from ringattn.parallel import ParallelDims
from ringattn.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class FinetuneConfig:
    model_dir: str | None = None
    tiny: bool = False
    dp: int = 1
    cp: int = 2
    seq_len: int = 256
    batch: int = 1  # sequences per dp rank
    steps: int = 10
    lr: float = 3e-4
    strategy: str = "ring"
    layout: str = "zigzag"
    dtype: str = "fp32"  # compute dtype; master weights and optimizer stay fp32
    data: str | None = None
    eos_id: int = 2
    ckpt_dir: str | None = None
    save_every: int = 0  # 0: only at the end
    save_hf: str | None = None
    seed: int = 0


def parse_args(argv=None) -> FinetuneConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, field in FinetuneConfig.__dataclass_fields__.items():
        flag = "--" + name.replace("_", "-")
        if field.type == "bool":
            p.add_argument(flag, action="store_true")
        else:
            kind = {"int": int, "float": float}.get(field.type, str)
            p.add_argument(flag, type=kind, default=field.default)
    cfg = FinetuneConfig(**vars(p.parse_args(argv)))
    # fail before any rank communicates
    if (cfg.model_dir is None) == (not cfg.tiny):
        p.error("give exactly one of --model-dir DIR or --tiny")
    if cfg.seq_len % (2 * cfg.cp if cfg.layout == "zigzag" else cfg.cp):
        p.error(f"--seq-len {cfg.seq_len} must divide into the {cfg.layout} chunks of cp={cfg.cp}")
    if cfg.data and cfg.batch != 1:
        p.error("--data: documents are found per sequence; use --batch 1 (one per dp rank)")
    if cfg.dtype not in ("fp32", "bf16"):
        p.error("--dtype must be fp32 or bf16")
    return cfg


def tiny_model(seed: int = 0):
    """A random 2-layer Llama (vocab 256, hidden 64, GQA 4/2): the --tiny model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1 << 16,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


def load_model(cfg: FinetuneConfig):
    if cfg.tiny:
        return tiny_model(cfg.seed)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        cfg.model_dir, torch_dtype=torch.float32, attn_implementation="sdpa"
    )


def synthetic_batch(step: int, dp_rank: int, cfg: FinetuneConfig, vocab: int):
    """(ids (batch, seq_len), cu_seqlens (n_docs + 1,) int32): packed documents of 1/8 to
    1/2 of the sequence, the same on every cp rank of one dp rank."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + dp_rank)
    bounds, end = [0], 0
    while end < cfg.seq_len:
        n = int(torch.randint(cfg.seq_len // 8, cfg.seq_len // 2 + 1, (1,), generator=g))
        end = min(cfg.seq_len, end + n)
        bounds.append(end)
    ids = torch.empty(cfg.batch, cfg.seq_len, dtype=torch.long)
    for a, b in zip(bounds[:-1], bounds[1:]):
        start, stride = torch.randint(0, vocab, (2, cfg.batch, 1), generator=g)
        ids[:, a:b] = (start + (stride % 7 + 1) * torch.arange(b - a)) % vocab
    return ids, torch.tensor(bounds, dtype=torch.int32)


def file_batch(tokens: torch.Tensor, step: int, dp_rank: int, cfg: FinetuneConfig):
    """Consecutive windows of a token file; documents split after each ``--eos-id``."""
    n = cfg.batch * cfg.seq_len
    windows = tokens.numel() // n  # whole windows; wraps around (epochs)
    if windows == 0:
        raise ValueError(f"--data holds {tokens.numel()} tokens, fewer than batch x seq_len = {n}")
    start = ((step * cfg.dp + dp_rank) % windows) * n
    ids = tokens[start : start + n].view(cfg.batch, cfg.seq_len)
    ends = (ids[0] == cfg.eos_id).nonzero().flatten() + 1  # documents of the first row
    bounds = sorted({0, cfg.seq_len, *ends.tolist()})
    return ids, torch.tensor(bounds, dtype=torch.int32)


def shard_model(model, dp_cp_mesh, dtype: str) -> None:
    """FSDP2 over dp x cp: every decoder layer a unit, the root holds embeddings and head.
    Gradients are SUMMED (the loss is already the global token mean, see cp_loss)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    param = torch.bfloat16 if dtype == "bf16" else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=param, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=dp_cp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_cp_mesh, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # gloo has no AVG / PREMUL_SUM


def save_hf(model, path: str) -> None:
    """Gather full weights to rank 0 and write a normal transformers checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=opts)  # collective
    if dist.get_rank() == 0:
        hf.disable(model)
        model.save_pretrained(path, state_dict=state)


def main(cfg: FinetuneConfig) -> None:
    cuda = torch.cuda.is_available()
    if cuda:  # one GPU per process; torchrun sets LOCAL_RANK
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    mesh = ParallelDims(dp=cfg.dp, cp=cfg.cp).build_mesh("cuda" if cuda else "cpu")
    cp_rank, dp_rank = mesh["cp"].get_local_rank(), mesh["dp"].get_local_rank()
    model = load_model(cfg)
    hf.enable(model, group=mesh["cp"].get_group(), layout=cfg.layout, strategy=cfg.strategy)
    if cuda:
        model.cuda()
    shard_model(model, mesh["dp_cp"], cfg.dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    step = 0
    if cfg.ckpt_dir and (last := latest_checkpoint(cfg.ckpt_dir)):
        step = load_checkpoint(last, model, opt)["step"]
        _log(f"resumed from {last} (step {step})")
    tokens = torch.load(cfg.data) if cfg.data else None
    vocab = model.config.vocab_size
    while step < cfg.steps:
        t0 = time.perf_counter()
        ids, cu = (
            file_batch(tokens, step, dp_rank, cfg)
            if tokens is not None
            else synthetic_batch(step, dp_rank, cfg, vocab)
        )
        batch = hf.prepare_batch(
            ids.to("cuda" if cuda else "cpu"),
            rank=cp_rank,
            world_size=cfg.cp,
            layout=cfg.layout,
            cu_seqlens=cu,
        )
        logits = model(**batch.model_inputs()).logits
        loss = hf.cp_loss(logits, batch.labels, group=mesh["dp_cp"].get_group())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tok_s = cfg.dp * cfg.batch * cfg.seq_len / (time.perf_counter() - t0)
        _log(f"step {step} loss {loss.item():.8f} tokens/s {tok_s:.0f}")
        if cfg.ckpt_dir and (step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0)):
            save_checkpoint(cfg.ckpt_dir, step, model, opt, {"seq_len": cfg.seq_len})
    if cfg.save_hf:
        save_hf(model, cfg.save_hf)
        _log(f"saved transformers checkpoint to {cfg.save_hf}")
    dist.destroy_process_group()


def _log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


if __name__ == "__main__":
    main(parse_args())
