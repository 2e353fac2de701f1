"""ringattn.integrations.hf on one process: batch preparation (global label shift, layout
positions, documents), the attention backend against transformers' own SDPA, and the errors
raised before any communication."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import ringattn  # noqa: E402
from ringattn.integrations import hf  # noqa: E402
from tests.hf_models import DOCS, build, doc_positions, tokens  # noqa: E402


def test_prepare_batch_worked_example():
    """The module docstring's example: s = 8, W = 2, zigzag, documents [0, 3) and [3, 8)."""
    ids = torch.arange(10, 18).unsqueeze(0)  # t0..t7 = 10..17
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    r0 = hf.prepare_batch(ids, rank=0, world_size=2, cu_seqlens=cu)
    r1 = hf.prepare_batch(ids, rank=1, world_size=2, cu_seqlens=cu)
    assert r0.input_ids.tolist() == [[10, 11, 16, 17]]
    assert r0.labels.tolist() == [[11, 12, 17, -100]]
    assert r0.position_ids.tolist() == [[0, 1, 3, 4]]
    assert r1.input_ids.tolist() == [[12, 13, 14, 15]]
    assert r1.labels.tolist() == [[-100, 14, 15, 16]]
    assert r1.position_ids.tolist() == [[2, 0, 1, 2]]
    assert r0.model_inputs()["cp_cu_seqlens"].tolist() == [0, 3, 8]


@pytest.mark.parametrize("layout", ringattn.LAYOUTS)
@pytest.mark.parametrize("world", [2, 4])
def test_prepare_batch_keeps_every_token_with_its_global_label(layout, world):
    ids = tokens(seed=3, batch=2, seq=32)
    labels = ids.clone()
    labels[:, :5] = -100  # e.g. a prompt: not predicted
    parts = [
        hf.prepare_batch(ids, rank=r, world_size=world, layout=layout, labels=labels)
        for r in range(world)
    ]
    perm = ringattn.permutation(32, layout, world)
    got_ids = torch.cat([p.input_ids for p in parts], dim=1)
    got_labels = torch.cat([p.labels for p in parts], dim=1)
    got_pos = torch.cat([p.position_ids for p in parts], dim=1)
    assert torch.equal(got_ids, ids[:, perm])
    expect = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    assert torch.equal(got_labels, expect[:, perm])
    assert torch.equal(got_pos, perm.expand(2, -1))


def test_prepare_batch_rejects_bad_documents():
    with pytest.raises(ValueError, match="cu_seqlens must rise strictly from 0"):
        hf.prepare_batch(tokens(), rank=0, world_size=2, cu_seqlens=[0, 10, 60])


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("docs", [False, True])
def test_one_rank_equals_transformers_sdpa(arch, docs):
    """cp = 1: logits and loss equal transformers' SDPA path, which builds its own causal,
    sliding-window and packed-sequence masks (from restarting position_ids)."""
    model = build(arch)
    ids = tokens()
    labels, kw = ids.clone(), {}
    if docs:
        kw["position_ids"] = doc_positions(DOCS, ids.shape[1]).expand(2, -1)
        labels[:, DOCS[1:-1]] = -100
    ref = model(input_ids=ids, labels=labels, **kw)
    hf.enable(model)
    batch = hf.prepare_batch(
        ids, rank=0, world_size=1, cu_seqlens=torch.tensor(DOCS) if docs else None
    )
    logits = model(**batch.model_inputs()).logits
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5)
    loss = hf.cp_loss(logits, batch.labels)
    assert abs(loss.item() - ref.loss.item()) <= 1e-6 * ref.loss.item()
    hf.disable(model)
    assert model.config._attn_implementation == "sdpa"


def test_unsupported_models_raise_in_enable():
    model = build("llama")
    model.config.attention_dropout = 0.1
    with pytest.raises(ValueError, match="attention_dropout=0.1 > 0 is not supported"):
        hf.enable(model)
    model.config.attention_dropout = 0.0
    model.config.is_encoder_decoder = True
    with pytest.raises(ValueError, match="cross-attention"):
        hf.enable(model)
    model.config.is_encoder_decoder = False
    with pytest.raises(ValueError, match="'ulysses' splits the 4 query heads over 3 ranks"):
        hf.check_model(model, strategy="ulysses", world=3)
    with pytest.raises(ValueError, match="strategy='tree' is unknown"):
        hf.enable(model, strategy="tree")
    with pytest.raises(ValueError, match="takes mesh="):
        hf.enable(model, strategy="hybrid")
    with pytest.raises(ValueError, match="grad_precision='half' is unknown"):
        hf.enable(model, grad_precision="half")
    assert model.config._attn_implementation == "sdpa"  # nothing was switched


def test_enable_passes_grad_precision():
    model = build("llama")
    hf.enable(model, grad_precision="fast")
    ctx = hf._CONTEXTS[hf._attention_modules(model)[0]]
    assert ctx.attend.keywords["grad_precision"] == "fast"
    hf.disable(model)


def test_unsupported_architecture_raises():
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        hf.enable(tf.GPT2LMHeadModel(cfg))


def test_masks_caches_and_manual_switch_raise_before_attention():
    model = hf.enable(build("llama"))
    ids = tokens()
    with pytest.raises(ValueError, match="attention_mask is not supported"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    with pytest.raises(ValueError, match="a prepared attention mask is not supported"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 64, 64, dtype=torch.bool))
    model.train()
    for layer in model.model.layers:  # changed after enable: caught in the forward
        layer.self_attn.attention_dropout = 0.5
    with pytest.raises(ValueError, match="attention dropout 0.5 > 0"):
        model(input_ids=ids)
    other = build("llama")
    other.set_attn_implementation(hf.NAME)  # registered, but this model was never enabled
    with pytest.raises(ValueError, match="was not set up for context parallelism"):
        other(input_ids=ids)


def test_enable_twice_then_disable_restores_the_original():
    model = build("llama", attn="eager")
    hf.enable(model)
    hf.enable(model, strategy="allgather")  # e.g. a new group or strategy
    assert model.config._attn_implementation == hf.NAME
    hf.disable(model)
    assert model.config._attn_implementation == "eager"
