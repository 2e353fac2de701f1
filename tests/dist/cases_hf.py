"""Worker-side functions for the transformers integration (module level: they pickle by
reference). A spec: arch, strategy, docs (bool), dtype ("fp32" | "bf16")."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ringattn.integrations import hf
from ringattn.strategies import hybrid_rank
from tests.dist.cases_cp import mesh_for
from tests.hf_models import DOCS, build, tokens

_MODELS: dict = {}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _model(arch: str, dtype: str, state: dict):
    """One model per (arch, dtype) per worker, weights from the parent (the reference's)."""
    key = (arch, dtype)
    if key not in _MODELS:
        _MODELS[key] = build(arch, dtype=DTYPES[dtype])
    model = _MODELS[key]
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    return model


def hf_train_step(specs: list[dict], states: dict) -> list[dict]:
    """For each spec: cp forward + backward of the global-mean loss on this rank's shard, then
    the parameter gradients SUMMED over the ranks (fp32). Rank 0 returns the gradients."""
    results = []
    for spec in specs:
        model = _model(spec["arch"], spec["dtype"], states[(spec["arch"], spec["dtype"])])
        rank, world = dist.get_rank(), dist.get_world_size()
        kw = dict(group=None, strategy=spec["strategy"], layout=spec.get("layout", "zigzag"))
        if spec["strategy"] == "hybrid":
            kw["mesh"] = mesh_for((2, 2), ("ring", "ulysses"))
            rank, world = hybrid_rank(kw["mesh"])
        hf.enable(model, **kw)
        cu = torch.tensor(DOCS) if spec["docs"] else None
        batch = hf.prepare_batch(
            tokens(), rank=rank, world_size=world, layout=kw["layout"], cu_seqlens=cu
        )
        logits = model(**batch.model_inputs()).logits
        loss = hf.cp_loss(logits, batch.labels)
        loss.backward()
        names, params = zip(*model.named_parameters())
        flat = torch.cat([p.grad.float().flatten() for p in params])
        dist.all_reduce(flat)  # one collective for all gradients
        grads = dict(zip(names, flat.split([p.numel() for p in params])))
        grads = {n: g.view_as(p) for (n, g), p in zip(grads.items(), params)}
        hf.disable(model)
        results.append({"loss": loss.item(), "grads": grads if dist.get_rank() == 0 else None})
    return results


def hf_rejects(arch: str, state: dict, *, mask: bool = False, **enable_kw) -> str:
    """enable() + one forward with a padding mask: must raise on every rank, before any
    collective (a rank that entered one would hang the others)."""
    model = build(arch)
    model.load_state_dict(state)
    hf.enable(model, **enable_kw)
    batch = hf.prepare_batch(tokens(), rank=dist.get_rank(), world_size=dist.get_world_size())
    kw = batch.model_inputs()
    if mask:
        kw["attention_mask"] = torch.ones_like(batch.input_ids)
    model(**kw)
    return "no error"
