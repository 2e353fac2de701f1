"""LLaMA-style model: config, presets and the transformer (no distributed code)."""

from ringattn.model.config import PRESETS, ModelConfig, get_preset
from ringattn.model.llama import (
    AttnFn,
    Block,
    RMSNorm,
    Transformer,
    apply_rope,
    rope_cos_sin,
    sdpa_attention,
)

__all__ = [
    "PRESETS",
    "AttnFn",
    "Block",
    "ModelConfig",
    "RMSNorm",
    "Transformer",
    "apply_rope",
    "get_preset",
    "rope_cos_sin",
    "sdpa_attention",
]
