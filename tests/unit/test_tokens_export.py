"""``data.kind = "tokens"`` packing against a brute-force reference built from the documents,
and ``ringattn export`` against transformers' own LlamaForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("numpy")
pytest.importorskip("tokenizers")

from ringattn.data import PrepareConfig, prepare_dataset  # noqa: E402
from ringattn.train.config import Config, load_config  # noqa: E402
from ringattn.train.data import IGNORE, build_dataset  # noqa: E402
from tests.token_corpus import documents, expected_ids, tokenizer, write_corpus  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokens")
    docs = documents()
    tok = tokenizer(tmp, docs)
    files = write_corpus(tmp / "in", docs)
    prepare_dataset(PrepareConfig(str(tok), [str(f) for f in files], str(tmp / "ds")))
    return tmp / "ds", expected_ids(tok, docs)


def _data(ds, cross=False, seed=7):
    cfg = Config.from_dict(
        {"data": {"kind": "tokens", "paths": [str(ds)], "cross_doc_attention": cross, "seed": seed}}
    )
    return build_dataset(cfg.data, 256)


def _reference_window(ids: list[list[int]], i: int, s: int, cross: bool):
    """Window i from the documents themselves: stream, boundaries, labels."""
    stream = [t for d in ids for t in d]
    starts, pos = [], 0
    for d in ids:
        starts.append(pos)
        pos += len(d)
    a = i * s
    tokens, labels = stream[a : a + s], stream[a + 1 : a + s + 1]
    inner = [p - a for p in starts if a < p < a + s]
    if not cross:
        for p in inner:
            labels[p - 1] = IGNORE
        if a + s in starts:
            labels[-1] = IGNORE
    return tokens, labels, [0, *inner, s]


@pytest.mark.parametrize("cross", [False, True])
def test_windows_match_the_documents(dataset, cross):
    ds, ids = dataset
    data, s = _data(ds, cross), 32
    n = (sum(map(len, ids)) - 1) // s
    for i in range(n):
        tokens, labels, cu = data.window(i, s)
        t, lab, c = _reference_window(ids, i, s, cross)
        assert tokens.tolist() == t and labels.tolist() == lab and cu.tolist() == c
    batch = data.batch(0, 4, s)
    assert (batch.cu_seqlens is None) == cross


def test_batch_is_a_function_of_seed_and_step(dataset):
    ds, _ = dataset
    a, b = _data(ds), _data(ds)
    for step in (5, 0, 9):  # any order, fresh objects: the same batches
        x, y = a.batch(step, 4, 32), b.batch(step, 4, 32)
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.labels, y.labels)
        assert all(torch.equal(p, q) for p, q in zip(x.cu_seqlens, y.cu_seqlens))
    assert not torch.equal(_data(ds, seed=8).batch(5, 4, 32).tokens, a.batch(5, 4, 32).tokens)


def test_config_checks_the_dataset(dataset, tmp_path):
    ds, _ = dataset
    with pytest.raises(ValueError, match="no manifest.json"):
        load_config("tiny", ["--data.kind=tokens", f"--data.paths=[{json.dumps(str(tmp_path))}]"])
    with pytest.raises(ValueError, match="model.vocab_size is 50"):
        load_config(
            "tiny",
            [
                "--data.kind=tokens",
                f"--data.paths=[{json.dumps(str(ds))}]",
                "--model.vocab_size=50",
            ],
        )
    with pytest.raises(ValueError, match="one folder"):
        load_config("tiny", ["--data.kind=tokens"])


@pytest.mark.parametrize("tie", [False, True])
def test_export_logits_equal_ours(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    import torch.distributed.checkpoint as dcp

    from ringattn.export import export_hf
    from ringattn.model import Transformer

    cfg = Config.from_dict(
        {"model": {"preset": "tiny", "tie_embeddings": tie, "rope_theta": 5000.0}}
    )
    model = Transformer(cfg.model.build())
    model.init_weights(3)
    with torch.no_grad():  # norm weights away from 1, so a dropped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    step = tmp_path / "ckpt" / "step_1"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(step), no_dist=True)
    (step / "trainer.json").write_text(json.dumps({"step": 1, "config": cfg.to_dict()}))
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens), hf.eval()(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_export_cli_error_is_one_line(tmp_path):
    from tests.cli_errors import assert_clean_error

    argv = ["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "hf")]
    assert_clean_error(argv, "no complete checkpoint", tmp_path)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()
