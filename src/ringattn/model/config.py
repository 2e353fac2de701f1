"""Model shapes: a dataclass and named presets (LLaMA-style decoder-only transformers).

The presets for the large models are shapes only: build them on the ``meta`` device for
planning and memory accounting (``ringattn plan`` reads them too).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None -> n_heads (MHA); fewer -> GQA/MQA
    ffn_hidden: int | None = None  # None -> LLaMA rule: 2/3 * 4 * dim rounded to multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    ffn_chunk: int | None = None  # blockwise FFN chunk (tokens); None -> plain FFN
    max_seq_len: int = 8192  # informational: RoPE is computed from positions on the fly

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        h = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)

    def n_params(self) -> int:
        """Exact parameter count of :class:`ringattn.model.Transformer` for this config."""
        d, hd = self.dim, self.head_dim
        attn = d * (self.n_heads * hd) * 2 + d * (self.kv_heads * hd) * 2
        ffn = 3 * d * self.hidden
        per_layer = attn + ffn + 2 * d  # two RMSNorm weights
        emb = self.vocab_size * d
        out = 0 if self.tie_embeddings else self.vocab_size * d
        return self.n_layers * per_layer + emb + out + d  # final norm

    def with_(self, **kw) -> ModelConfig:
        return replace(self, **kw)


PRESETS: dict[str, ModelConfig] = {
    # CPU-sized: trains on the retrieval task in minutes on 4 gloo ranks.
    "tiny": ModelConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2),
    # Shapes of the LLaMA models the Ring Attention paper evaluates (vocab 32K, MHA).
    "llama-3b": ModelConfig(vocab_size=32000, dim=3200, n_layers=26, n_heads=32, ffn_hidden=8640),
    "llama-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_hidden=11008),
    "llama-13b": ModelConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, ffn_hidden=13824),
    "llama-30b": ModelConfig(vocab_size=32000, dim=6656, n_layers=60, n_heads=52, ffn_hidden=17920),
    "llama3-8b": ModelConfig(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden=14336,
        rope_theta=500000.0,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"model preset {name!r} is unknown; choose one of {sorted(PRESETS)}"
        ) from None
