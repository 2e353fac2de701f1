"""``ringattn export``: a training checkpoint (DCP, any dp / cp / tp) -> a Hugging Face
``LlamaForCausalLM`` folder (``config.json`` + ``model.safetensors``).

The checkpoint holds global tensors under fully-qualified names (``model.layers.0...``), so
one process reads it whatever degrees it was saved with: ``dcp.load(..., no_dist=True)``
into a plain model built on the meta device and materialised empty (no init, no copy).

Two conventions differ from transformers' LLaMA:

* names: ``tok_embeddings`` / ``attention.wq`` / ``feed_forward.w1`` ... -> ``embed_tokens``
  / ``self_attn.q_proj`` / ``mlp.gate_proj`` ... (SwiGLU ``w2(silu(w1 x) * w3 x)``: w1 is the
  gate, w3 the up projection, w2 the down projection).
* RoPE: ours rotates interleaved pairs ``(x[2i], x[2i+1])`` by frequency ``i``; transformers'
  ``rotate_half`` rotates ``(x[i], x[i + hd/2])``. Reordering each head's output rows of
  ``wq`` and ``wk`` from ``[0, 1, 2, 3, ...]`` to ``[0, 2, 4, ..., 1, 3, 5, ...]`` maps one
  onto the other; q.k is unchanged because q and k get the same permutation, and v / o are
  untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ringattn.model import Transformer
from ringattn.model.config import ModelConfig

__all__ = ["export_hf", "hf_config", "hf_state_dict", "load_checkpoint_model"]


def _model_config(ckpt: Path) -> ModelConfig:
    from ringattn.train.config import Config

    meta = ckpt / "trainer.json"
    if not meta.is_file():
        raise ValueError(
            f"--checkpoint {ckpt}: not a complete ringattn checkpoint (no trainer.json); "
            "pass a step_N folder or the checkpoint folder holding `latest`"
        )
    return Config.from_dict(json.loads(meta.read_text())["config"]).model.build()


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``step_N`` folder, or a checkpoint folder (its newest complete ``step_N``)."""
    from ringattn.train.checkpoint import latest_checkpoint

    path = Path(path)
    if (path / "trainer.json").is_file():
        return path
    found = latest_checkpoint(path) or latest_checkpoint(path / "checkpoints")
    if found is None:
        raise ValueError(f"--checkpoint {path}: no complete checkpoint (step_N/trainer.json)")
    return found


def load_checkpoint_model(path: str | Path) -> Transformer:
    """The model of a checkpoint, fp32, on CPU, in this process (no process group)."""
    import torch.distributed.checkpoint as dcp

    ckpt = resolve_checkpoint(path)
    cfg = _model_config(ckpt)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty unties
    state = {"model": model.state_dict()}
    if cfg.tie_embeddings:  # saved once, under the embedding's name
        state["model"].pop("output.weight", None)
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)  # fills the tensors in place
    return model


def _rope_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``(heads * hd, dim)`` rows reordered per head from interleaved pairs to halves."""
    heads = w.shape[0] // head_dim
    return w.view(heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our parameters under transformers' ``LlamaForCausalLM`` names and RoPE convention."""
    cfg, hd = model.cfg, model.cfg.head_dim
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"]}
    names = {
        "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj",
        "feed_forward.w3": "mlp.up_proj",
        "feed_forward.w2": "mlp.down_proj",
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        out[theirs + "self_attn.q_proj.weight"] = _rope_rows(sd[ours + "attention.wq.weight"], hd)
        out[theirs + "self_attn.k_proj.weight"] = _rope_rows(sd[ours + "attention.wk.weight"], hd)
        for a, b in names.items():
            out[f"{theirs}{b}.weight"] = sd[f"{ours}{a}.weight"]
    out["model.norm.weight"] = sd["norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(cfg: ModelConfig):
    """The ``transformers.LlamaConfig`` of the same network."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        torch_dtype="float32",
        architectures=["LlamaForCausalLM"],
    )


def export_hf(checkpoint: str | Path, out: str | Path, tokenizer: str | None = None) -> Path:
    """Write ``out/config.json`` + ``out/model.safetensors`` (+ ``tokenizer.json`` if given),
    atomically: built in ``out.tmp`` and renamed."""
    try:
        from safetensors.torch import save_file
    except ImportError:  # pragma: no cover - the `data` extra
        raise ValueError("ringattn export needs transformers and safetensors") from None
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty folder")
    model = load_checkpoint_model(checkpoint)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hf_config(model.cfg).save_pretrained(tmp)
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
