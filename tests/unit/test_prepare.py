"""``ringattn prepare``: documents -> token dataset, checked against the tokenizer itself;
bad inputs fail with one line and leave nothing behind; an interrupted run resumes."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("numpy")
pytest.importorskip("tokenizers")

import numpy as np  # noqa: E402

import ringattn.data.prepare as prep  # noqa: E402
from ringattn.data import PrepareConfig, TokenFile, prepare_dataset  # noqa: E402
from ringattn.data.tokenfile import token_dtype  # noqa: E402
from tests.cli_errors import assert_clean_error, run_cli  # noqa: E402
from tests.token_corpus import documents, expected_ids, tokenizer, write_corpus  # noqa: E402


@pytest.fixture
def corpus(tmp_path):
    docs = documents()
    tok = tokenizer(tmp_path, docs)
    return tok, write_corpus(tmp_path / "in", docs), docs


def _all_docs(tf: TokenFile) -> list[list[int]]:
    return [tf.document(i).tolist() for i in range(tf.n_docs)]


def _leftovers(out) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))


@pytest.mark.parametrize("workers", [1, 2])
def test_dataset_equals_the_tokenizer_document_by_document(corpus, tmp_path, workers):
    tok, files, docs = corpus
    # 64-character pieces: every .txt document is encoded in several line-aligned pieces
    cfg = PrepareConfig(str(tok), [str(tmp_path / "in")], str(tmp_path / "ds"), workers=workers)
    cfg.chunk_bytes = 64
    m = prepare_dataset(cfg)
    tf = TokenFile(tmp_path / "ds")
    want = expected_ids(tok, docs)
    assert _all_docs(tf) == want  # folder order: doc0..3.txt, part0.jsonl, part1.jsonl
    assert tf.n_docs == len(docs) == m["n_docs"]
    assert tf.n_tokens == sum(map(len, want))
    assert tf.tokens.dtype == np.uint16 and tf.eos_id == want[0][-1]
    assert list(tf.doc_starts) == [0, *np.cumsum([len(w) for w in want]).tolist()]
    assert _leftovers(tmp_path / "ds") == ["ds"]  # no .partial / .tmp left


def test_token_dtype_by_vocabulary():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def _bad(tmp_path, kind):
    f = tmp_path / {"json": "x.jsonl", "field": "x.jsonl"}.get(kind, "x.txt")
    content = {
        "utf8": b"caf\xe9 au lait\n",
        "empty": b"",
        "json": b'{"text": "ok"}\n{"text": \n',
        "field": b'{"body": "no text field"}\n',
    }[kind]
    f.write_bytes(content)
    return f


@pytest.mark.parametrize(
    "kind, message",
    [
        ("utf8", "not UTF-8"),
        ("empty", "empty"),
        ("json", "x.jsonl:2: not valid JSON"),
        ("field", "no field 'text'"),
    ],
)
def test_bad_input_is_one_error_and_leaves_nothing(corpus, tmp_path, kind, message):
    tok, files, _ = corpus
    bad = _bad(tmp_path, kind)
    out = tmp_path / "ds"
    with pytest.raises(ValueError, match=message) as e:
        prepare_dataset(PrepareConfig(str(tok), [str(files[0]), str(bad)], str(out)))
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
    assert _leftovers(out) == []  # not ds, ds.partial nor ds.tmp


def test_missing_input_and_existing_output(corpus, tmp_path):
    tok, files, _ = corpus
    with pytest.raises(ValueError, match="no such file"):
        prepare_dataset(PrepareConfig(str(tok), [str(tmp_path / "nope.txt")], str(tmp_path / "ds")))
    prepare_dataset(PrepareConfig(str(tok), [str(files[0])], str(tmp_path / "ds")))
    with pytest.raises(ValueError, match="already exists"):
        prepare_dataset(PrepareConfig(str(tok), [str(files[0])], str(tmp_path / "ds")))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod-000 file")
def test_unreadable_file(corpus, tmp_path):
    tok, files, _ = corpus
    files[0].chmod(0)
    with pytest.raises(ValueError, match="cannot read"):
        prepare_dataset(PrepareConfig(str(tok), [str(files[0])], str(tmp_path / "ds")))
    assert _leftovers(tmp_path / "ds") == []


def test_interrupted_run_resumes_and_skips_finished_files(corpus, tmp_path, monkeypatch):
    tok, files, docs = corpus
    out = tmp_path / "ds"
    cfg = PrepareConfig(str(tok), [str(f) for f in files], str(out))
    real, calls = prep.tokenize_file, []

    def crash_on_third(cfg, path, shard, vocab, eos):  # Ctrl-C while tokenizing file 3
        calls.append(path.name)
        if len(calls) == 3:
            shard.with_suffix(".tokens.tmp").write_bytes(b"\x01\x00" * 7)  # half-written
            raise KeyboardInterrupt
        return real(cfg, path, shard, vocab, eos)

    monkeypatch.setattr(prep, "tokenize_file", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg)
    assert not out.exists()  # nothing that could be loaded as a dataset
    with pytest.raises(ValueError, match="no manifest.json"):
        TokenFile(out)
    done = sorted((tmp_path / "ds.partial" / "shards").glob("*.json"))
    assert len(done) == 2

    calls.clear()
    monkeypatch.setattr(prep, "tokenize_file", lambda *a: (calls.append(a[1].name), real(*a))[1])
    m = prepare_dataset(cfg)
    assert m["resumed_files"] == 2 and calls == [f.name for f in files[2:]]
    assert _all_docs(TokenFile(out)) == expected_ids(tok, docs)
    assert _leftovers(out) == ["ds"]


def test_changed_input_is_tokenized_again(corpus, tmp_path, monkeypatch):
    tok, files, docs = corpus
    cfg = PrepareConfig(str(tok), [str(files[0])], str(tmp_path / "ds"))
    monkeypatch.setattr(prep, "_assemble", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg)
    monkeypatch.undo()
    files[0].write_text(docs[1])  # edited after the interruption: its shard is stale
    assert prepare_dataset(cfg)["resumed_files"] == 0
    assert _all_docs(TokenFile(tmp_path / "ds")) == expected_ids(tok, [docs[1]])


def test_cli_prepare_and_its_errors(corpus, tmp_path):
    tok, files, _ = corpus
    rc, out, err = run_cli(
        ["prepare", "--tokenizer", str(tok), "--input", str(tmp_path / "in"), "--out", "ds"],
        tmp_path,
    )
    assert rc == 0, err
    assert out.startswith("wrote ds:") and "tokens/s" in out and err == ""  # stderr not a tty
    meta = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert meta["n_docs"] == 40
    bad = _bad(tmp_path, "utf8")
    argv = ["prepare", "--tokenizer", str(tok), "--input", str(bad), "--out", "ds2"]
    assert_clean_error(argv, "not UTF-8", tmp_path)
    assert _leftovers(tmp_path / "ds2") == []
