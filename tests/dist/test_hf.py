"""transformers models under context parallelism on real gloo processes: the loss and EVERY
parameter gradient equal the single-process transformers model (its own SDPA attention, its
own packed-sequence masks and its own label shift), for each architecture, strategy, world
size, with and without packed documents."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("transformers")

from tests.dist.cases_hf import hf_rejects, hf_train_step  # noqa: E402
from tests.dist.pool import RankError  # noqa: E402
from tests.hf_models import DOCS, build, doc_positions, tokens  # noqa: E402

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
STRATEGIES = ["ring", "allgather", "ulysses"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def reference(arch: str, docs: bool, dtype: str = "fp32"):
    """(state_dict, loss, grads) of the single-process model on the whole sequence. With
    documents, transformers builds its own packed-sequence mask from restarting positions,
    and its loss shifts the labels itself (a document's first token is no target)."""
    model = build(arch, dtype=DTYPES[dtype])
    ids = tokens()
    labels = ids.clone()
    kw = {}
    if docs:
        kw["position_ids"] = doc_positions(DOCS, ids.shape[1]).expand(ids.shape[0], -1)
        labels[:, DOCS[1:-1]] = -100
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, out.loss.item(), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: relative to the tensor's scale, not per element."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("world", [2, 4])
def test_loss_and_every_gradient_match_single_process(pools, world):
    refs = {(a, d): reference(a, d) for a, d in itertools.product(ARCHS, [False, True])}
    specs = [
        dict(arch=a, strategy=s, docs=d, dtype="fp32")
        for a, s, d in itertools.product(ARCHS, STRATEGIES, [False, True])
    ]
    if world == 4:
        specs += [dict(arch="llama", strategy="hybrid", docs=d, dtype="fp32") for d in (0, 1)]
    states = {(a, "fp32"): refs[(a, False)][0] for a in ARCHS}
    per_rank = pools(world).run(hf_train_step, specs, states, timeout=300)
    for i, spec in enumerate(specs):
        _, loss_ref, grads_ref = refs[(spec["arch"], bool(spec["docs"]))]
        losses = [r[i]["loss"] for r in per_rank]
        assert all(abs(x - loss_ref) <= 1e-5 * abs(loss_ref) for x in losses), (spec, losses)
        grads = per_rank[0][i]["grads"]
        assert grads.keys() == grads_ref.keys()
        for name, g in grads.items():
            err = rel_err(g, grads_ref[name])
            assert err <= 1e-5, (spec, name, err)


def test_documents_and_windows_change_the_result():
    """The reference is sensitive to what is checked: packed documents and Mistral's sliding
    window (20 < 64 tokens) each change the loss."""
    _, plain, _ = reference("mistral", docs=False)
    _, docs, _ = reference("mistral", docs=True)
    assert abs(plain - docs) > 1e-3
    model = build("mistral")
    model.config.sliding_window = None
    full = model(input_ids=tokens(), labels=tokens()).loss.item()
    assert abs(full - plain) > 1e-4


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_bf16_error_at_most_twice_single_process_bf16(pools, arch):
    """bf16 at cp = 2 (ring and ulysses) against a float64 oracle: its error is at most 2x
    that of the single-process bf16 model (flash-attn's rule), loss and all gradients."""
    state64 = {k: v.double() for k, v in reference(arch, True)[0].items()}
    state16 = {k: v.to(torch.bfloat16) for k, v in state64.items()}
    # the oracle runs the bf16-ROUNDED weights in float64: only arithmetic differs
    oracle = build(arch, dtype=torch.float64)
    oracle.load_state_dict({k: v.double() for k, v in state16.items()})
    _, loss64, g64 = _run(oracle, True)
    single = build(arch, dtype=torch.bfloat16)
    single.load_state_dict(state16)
    _, loss16, g16 = _run(single, True)
    specs = [dict(arch=arch, strategy=s, docs=True, dtype="bf16") for s in ("ring", "ulysses")]
    per_rank = pools(2).run(hf_train_step, specs, {(arch, "bf16"): state16}, timeout=300)
    flat = lambda g: torch.cat([t.double().flatten() for t in g.values()])
    base_err = (flat(g16) - flat(g64)).norm().item()
    for i, spec in enumerate(specs):
        loss = per_rank[0][i]["loss"]
        assert abs(loss - loss64) <= 2 * abs(loss16 - loss64) + 1e-3 * abs(loss64), spec
        err = (flat(per_rank[0][i]["grads"]) - flat(g64)).norm().item()
        assert err <= 2 * base_err, (spec, err, base_err)


def _run(model, docs: bool):
    ids = tokens()
    labels = ids.clone()
    labels[:, DOCS[1:-1]] = -100
    pos = doc_positions(DOCS, ids.shape[1]).expand(ids.shape[0], -1)
    out = model(input_ids=ids, labels=labels, position_ids=pos)
    out.loss.backward()
    return None, out.loss.item(), {n: p.grad for n, p in model.named_parameters()}


def test_unservable_attention_raises_on_every_rank_then_the_pool_still_works(pools):
    state = reference("llama", False)[0]
    with pytest.raises(RankError) as e:
        pools(2).run(hf_rejects, "llama", state, strategy="ring", mask=True)
    assert len(e.value.errors) == 2
    assert all("attention_mask is not supported" in m for _, m, _ in e.value.errors.values())
    per_rank = pools(2).run(
        hf_train_step, [dict(arch="llama", strategy="ring", docs=False, dtype="fp32")],
        {("llama", "fp32"): state},
    )
    assert len(per_rank) == 2
