"""Tokens/s of one context-parallel training step: a transformers Llama under
``ringattn.integrations.hf`` vs ringattn's own model of the same shape, in one run.

    torchrun --standalone --nproc-per-node=4 benchmarks/hf_overhead.py --seq-len 4096

Three steps, same batch, same loss (:func:`ringattn.integrations.hf.cp_loss`), one flat
gradient all-reduce and an AdamW step each:

- ``hf``: the transformers Llama; its attention calls ``context_parallel_attention``;
- ``ours_cpa``: our model calling ``context_parallel_attention`` the same way, so
  ``overhead`` = ours_cpa / hf tokens/s is the cost of the transformers model code alone;
- ``ours``: our model as the trainer runs it (:class:`ringattn.parallel.CPAttention`; for
  "ring" it calls ``ring_attention`` directly, without the per-call input agreement).

Steps alternate between the models, so a change in machine load hits all alike; the median
step time (the slowest rank's) is reported. Rank 0 prints one JSON row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from ringattn import context_parallel_attention
from ringattn.integrations import hf
from ringattn.model import ModelConfig, Transformer
from ringattn.parallel import CPAttention


def hf_llama(cfg: ModelConfig):
    """The transformers Llama with exactly the shape of ``cfg`` (untied head, SwiGLU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.dim,
            intermediate_size=cfg.hidden,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.kv_heads,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            max_position_embeddings=1 << 20,
            tie_word_embeddings=False,
            use_cache=False,
            attn_implementation="sdpa",
        )
    )


def step_fn(model, forward, batch, group):
    """One training step -> seconds: forward, global-mean loss, backward, grad sum, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        t0 = time.perf_counter()
        loss = hf.cp_loss(forward(batch), batch.labels, group=group)
        loss.backward()
        flat = torch.cat([p.grad.flatten() for p in model.parameters()])
        dist.all_reduce(flat, group=group)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--strategy", default="ring")
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig(
        vocab_size=a.vocab, dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads
    )
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, a.seq_len))
    batch = hf.prepare_batch(ids, rank=rank, world_size=world, layout=a.layout)

    theirs = hf.enable(hf_llama(cfg), layout=a.layout, strategy=a.strategy)
    ours, ours_cpa = Transformer(cfg), Transformer(cfg)
    ours.init_weights(seed=0)
    ours_cpa.load_state_dict(ours.state_dict())
    ours.set_attention(CPAttention(None, world, a.layout, a.strategy))
    kw = dict(layout=a.layout, strategy=a.strategy)
    ours_cpa.set_attention(
        lambda q, k, v, causal: context_parallel_attention(q, k, v, causal=causal, **kw)
    )
    n_hf = sum(p.numel() for p in theirs.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_hf == n_ours == cfg.n_params(), (n_hf, n_ours, cfg.n_params())

    steps = {
        "hf": step_fn(theirs, lambda b: theirs(**b.model_inputs()).logits, batch, None),
        "ours_cpa": step_fn(
            ours_cpa, lambda b: ours_cpa(b.input_ids, b.position_ids[0]), batch, None
        ),
        "ours": step_fn(ours, lambda b: ours(b.input_ids, b.position_ids[0]), batch, None),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(a.warmup + a.steps):
        for name, step in steps.items():  # alternate: load changes hit both alike
            dist.barrier()
            t = torch.tensor([step()])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
            if i >= a.warmup:
                times[name].append(t.item())
    if rank == 0:
        tok_s = {k: a.seq_len / statistics.median(v) for k, v in times.items()}
        row = dict(
            cp=world,
            seq_len=a.seq_len,
            params=n_ours,
            strategy=a.strategy,
            layout=a.layout,
            tokens_per_s={k: round(v, 1) for k, v in tok_s.items()},
            overhead=round(tok_s["ours_cpa"] / tok_s["hf"], 3),
            overhead_vs_trainer=round(tok_s["ours"] / tok_s["hf"], 3),
            step_s={k: [round(x, 3) for x in v] for k, v in times.items()},
        )
        print(json.dumps(row), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
