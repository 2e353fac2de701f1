"""Tiny transformers models built from configs (random weights, nothing downloaded), shared by
the unit and multi-process tests of ringattn.integrations.hf."""

from __future__ import annotations

import torch

VOCAB, SEQ = 96, 64
DOCS = [0, 13, 30, 37, 64]  # boundaries inside shards and a 7-token document


def config(arch: str):
    """2 layers, hidden 64, GQA; Mistral with a window shorter than the sequence, Qwen2 with
    one full and one sliding layer, Qwen3 with MQA (one K/V head) and q/k norms."""
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attention_dropout=0.0,
        use_cache=False,
    )
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=20)
    if arch == "qwen2":
        return tf.Qwen2Config(
            **common, use_sliding_window=True, sliding_window=24, max_window_layers=1
        )
    if arch == "qwen3":
        return tf.Qwen3Config(**{**common, "num_key_value_heads": 1}, head_dim=16)
    raise ValueError(arch)


def build(arch: str, seed: int = 0, dtype=torch.float32, attn: str = "sdpa"):
    """A causal LM with deterministic random weights, in eval mode (no dropout anywhere)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = config(arch)
    cfg._attn_implementation = attn
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    return model.to(dtype).eval()


def tokens(seed: int = 0, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def doc_positions(cu: list[int], seq: int) -> torch.Tensor:
    """(seq,) positions restarting at each document: the single-process reference input."""
    return torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])
