"""LLaMA model: shapes on meta, RoPE from explicit positions, injected attention, AC, init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ringattn.model import (
    PRESETS,
    Transformer,
    apply_rope,
    get_preset,
    rope_cos_sin,
    sdpa_attention,
)
from ringattn.parallel.ac import apply_ac

TINY = get_preset("tiny")  # dim 128, 2 layers, 4 heads, 2 kv heads, vocab 256


def _tokens(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


def _masked_attn(allowed: torch.Tensor):
    """attn_fn using an explicit boolean mask ``allowed (s_q, s_k)`` (True = may attend)."""

    def attn(q, k, v, causal=True):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, h, s, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        return out.transpose(1, 2)

    return attn


def _causal_by_position(pos: torch.Tensor) -> torch.Tensor:
    """Causal mask for tokens held in any order: key j is visible to query i iff pos_j <= pos_i."""
    return pos[None, :] <= pos[:, None]


# --- shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("tie", [False, True])
def test_meta_param_count_matches_config(name, tie):
    cfg = get_preset(name).with_(tie_embeddings=tie)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.n_params()
    assert all(p.is_meta for p in model.parameters())


def test_module_names_are_torchtitan_like():
    keys = set(Transformer(TINY).state_dict())
    for k in [
        "tok_embeddings.weight",
        "layers.0.attention.wq.weight",
        "layers.0.attention.wk.weight",
        "layers.0.attention.wv.weight",
        "layers.0.attention.wo.weight",
        "layers.1.feed_forward.w1.weight",
        "layers.1.feed_forward.w2.weight",
        "layers.1.feed_forward.w3.weight",
        "layers.1.attention_norm.weight",
        "layers.1.ffn_norm.weight",
        "norm.weight",
        "output.weight",
    ]:
        assert k in keys, k


def test_forward_shape_and_dtype():
    model = Transformer(TINY)
    logits = model(_tokens(2, 8))
    assert logits.shape == (2, 8, TINY.vocab_size) and logits.dtype == torch.float32
    bf16 = Transformer(TINY).to(torch.bfloat16)
    assert bf16(_tokens(2, 8)).dtype == torch.bfloat16


# --- attention injection ------------------------------------------------------------------


def test_gqa_kv_heads_are_not_repeated_before_attn_fn():
    seen = []

    def spy(q, k, v, causal=True):
        seen.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), causal))
        return sdpa_attention(q, k, v, causal)

    model = Transformer(TINY, attn_fn=spy)
    model(_tokens(2, 8))
    hd = TINY.head_dim
    expected = (
        (2, 8, TINY.n_heads, hd),
        (2, 8, TINY.kv_heads, hd),
        (2, 8, TINY.kv_heads, hd),
        True,
    )
    assert TINY.kv_heads < TINY.n_heads
    assert seen == [expected] * TINY.n_layers


def test_default_attention_equals_float64_naive_gqa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 7, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    kr, vr = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)  # oracle only
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kr) / 8**0.5
    scores = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vr)
    torch.testing.assert_close(sdpa_attention(q, k, v), ref, rtol=1e-10, atol=1e-10)


def test_set_attention_replaces_every_layer():
    model = Transformer(TINY)
    tokens = _tokens(1, 6)
    ref = model(tokens)
    calls = []

    def counting(q, k, v, causal=True):
        calls.append(1)
        return sdpa_attention(q, k, v, causal)

    model.set_attention(counting)
    torch.testing.assert_close(model(tokens), ref, rtol=0, atol=0)
    assert len(calls) == TINY.n_layers
    model.set_attention(None)
    model(tokens)
    assert len(calls) == TINY.n_layers
    assert all(layer.attention.attn_fn is sdpa_attention for layer in model.layers)


# --- RoPE and positions -------------------------------------------------------------------


def test_positions_default_is_arange():
    model = Transformer(TINY)
    tokens = _tokens(2, 8)
    ref = model(tokens)
    torch.testing.assert_close(model(tokens, torch.arange(8)), ref, rtol=0, atol=0)
    torch.testing.assert_close(model(tokens, torch.arange(8).expand(2, 8)), ref, rtol=0, atol=0)


def test_rope_scores_depend_only_on_position_difference():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)

    def score(pq: int, pk: int) -> float:
        cq, sq = rope_cos_sin(torch.tensor([pq]), 16, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([pk]), 16, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    ref = score(7, 3)
    for shift in [1, 100, 100_000, 1_000_000]:
        assert score(7 + shift, 3 + shift) == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)  # it does depend on the gap


def test_rope_is_a_rotation():
    x = torch.randn(2, 5, 3, 16, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(5) * 1000, 16, 10000.0)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=1e-6)
    cos0, sin0 = rope_cos_sin(torch.zeros(5, dtype=torch.long), 16, 10000.0)
    torch.testing.assert_close(apply_rope(x, cos0, sin0), x, rtol=0, atol=0)


def test_shifting_all_positions_leaves_logits_unchanged():
    model = Transformer(TINY)
    tokens = _tokens(2, 10)
    ref = model(tokens)
    for shift in [1, 1000, 123_457]:
        got = model(tokens, torch.arange(10) + shift)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["zigzag", "random"])
def test_permuted_sequence_with_positions_gives_same_per_token_logits(kind):
    # What a zigzag/striped shard does: tokens held out of order, with their global positions
    # and a causal mask built from those positions. Every token must get the same logits.
    s = 16
    if kind == "zigzag":  # world 2: chunks of s/4; rank r holds chunk r and chunk 3 - r
        c = torch.arange(s).view(4, s // 4)
        perm = torch.cat([c[0], c[3], c[1], c[2]])
    else:
        perm = torch.randperm(s, generator=torch.Generator().manual_seed(1))
    model = Transformer(TINY)
    tokens = _tokens(2, s)
    ref = model(tokens)
    model.set_attention(_masked_attn(_causal_by_position(perm)))
    got = model(tokens[:, perm], positions=perm)
    torch.testing.assert_close(got, ref[:, perm], rtol=1e-5, atol=1e-5)


def test_packed_documents_with_restarting_positions_match_separate_runs():
    lens = [5, 3]
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))  # (s,)
    pos = torch.cat([torch.arange(n) for n in lens])  # restarts per document
    allowed = (doc[:, None] == doc[None, :]) & _causal_by_position(pos)
    model = Transformer(TINY)
    tokens = _tokens(1, sum(lens))
    ref = torch.cat([model(part) for part in tokens.split(lens, dim=1)], dim=1)
    model.set_attention(_masked_attn(allowed))
    torch.testing.assert_close(model(tokens, positions=pos[None]), ref, rtol=1e-5, atol=1e-5)


def test_bad_positions_shape_raises():
    with pytest.raises(ValueError, match="positions"):
        Transformer(TINY)(_tokens(1, 8), torch.arange(7))


# --- FFN chunking, activation checkpointing -----------------------------------------------


def _loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_blockwise_ffn_model_matches_plain_model():
    plain = Transformer(TINY)
    chunked = Transformer(TINY.with_(ffn_chunk=3))
    chunked.load_state_dict(plain.state_dict())
    tokens = _tokens(2, 10)
    loss_p, grads_p = _loss_and_grads(plain, tokens)
    loss_c, grads_c = _loss_and_grads(chunked, tokens)
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-6, atol=1e-6)
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_activation_checkpointing_gives_identical_grads_and_keys():
    model = Transformer(TINY)
    keys = list(model.state_dict())
    tokens = _tokens(2, 8)
    loss_ref, grads_ref = _loss_and_grads(model, tokens)
    assert apply_ac(model, "full") is model
    assert all(layer.ac for layer in model.layers)
    assert list(model.state_dict()) == keys
    loss_ac, grads_ac = _loss_and_grads(model, tokens)
    torch.testing.assert_close(loss_ac, loss_ref, rtol=0, atol=0)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads_ac[name], g, rtol=0, atol=0, msg=name)
    apply_ac(model, "none")
    assert not any(layer.ac for layer in model.layers)


def test_activation_checkpointing_recomputes_in_backward():
    calls = []

    def counting(q, k, v, causal=True):
        calls.append(1)
        return sdpa_attention(q, k, v, causal)

    model = apply_ac(Transformer(TINY, attn_fn=counting), "full")
    _loss_and_grads(model, _tokens(1, 4))
    assert len(calls) == 2 * TINY.n_layers  # forward + recompute
    calls.clear()
    with torch.no_grad():
        model(_tokens(1, 4))
    assert len(calls) == TINY.n_layers


def test_apply_ac_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        apply_ac(Transformer(TINY), "selective-op")
    with pytest.raises(ValueError, match="Block"):
        apply_ac(torch.nn.Linear(2, 2))


# --- embeddings, init, FLOPs --------------------------------------------------------------


def test_tied_embeddings_share_the_tensor():
    cfg = TINY.with_(tie_embeddings=True)
    model = Transformer(cfg)
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == cfg.n_params()
    _, grads = _loss_and_grads(model, _tokens(1, 6))
    assert "output.weight" not in grads  # one parameter, one gradient
    # meta -> to_empty unties them; init_weights re-ties and initialises deterministically.
    with torch.device("meta"):
        meta_model = Transformer(cfg)
    meta_model.to_empty(device="cpu")
    meta_model.init_weights(seed=0)
    assert meta_model.output.weight is meta_model.tok_embeddings.weight
    for (n, a), b in zip(model.state_dict().items(), meta_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    untied = Transformer(TINY)
    assert untied.output.weight is not untied.tok_embeddings.weight


def test_init_weights_is_deterministic_and_leaves_global_rng_alone():
    a, b = Transformer(TINY), Transformer(TINY)
    state = torch.get_rng_state()
    a.init_weights(seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b.init_weights(seed=3)
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=n)
    b.init_weights(seed=4)
    assert not torch.equal(a.tok_embeddings.weight, b.tok_embeddings.weight)
    wq, wo = a.layers[0].attention.wq.weight, a.layers[0].attention.wo.weight
    assert wq.std().item() == pytest.approx(0.02, rel=0.05)
    assert wo.std().item() == pytest.approx(0.02 / (2 * TINY.n_layers) ** 0.5, rel=0.05)
    assert torch.equal(a.norm.weight, torch.ones(TINY.dim))


def test_flops_per_token_formula():
    cfg = TINY
    model = Transformer(cfg)
    matmul_params = sum(
        p.numel() for n, p in model.named_parameters() if "norm" not in n and "tok_emb" not in n
    )
    s = 64
    attn = 12 * cfg.n_layers * cfg.dim * s
    assert model.flops_per_token(s, causal=False) == 6 * matmul_params + attn
    assert model.flops_per_token(s) == 6 * matmul_params + attn / 2
    with torch.device("meta"):
        big = Transformer(get_preset("llama-7b"))
    # ~6 * 6.5e9 matmul params plus attention: about 4.2e10 FLOPs per token at 4K.
    assert 3.9e10 < big.flops_per_token(4096) < 4.4e10
