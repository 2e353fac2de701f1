"""Training data: the retrieval task, packed byte-level text, sharding with labels."""

from __future__ import annotations

import pytest
import torch

import ringattn
from ringattn.parallel.cp import local_doc_attention, shard_batch
from ringattn.train.data import IGNORE, RetrievalTask, TextData, read_documents


def _task(**kw):
    base = dict(n_pairs=3, n_keys=6, n_values=5, n_filler=20, vocab_size=64, seed=5)
    return RetrievalTask(**{**base, **kw})


def _stored_pairs(task: RetrievalTask, hay: torch.Tensor) -> dict[int, int]:
    """{key token: value token} of the needles in a haystack."""
    if task.needle == "token":
        ids = hay[(hay >= task.needle0) & (hay < task.value0)] - task.needle0
        return {
            task.key0 + int(i) // task.n_values: task.value0 + int(i) % task.n_values for i in ids
        }
    at = (hay == task.needle0).nonzero().flatten()
    return {int(hay[i + 1]): int(hay[i + 2]) for i in at}


@pytest.mark.parametrize("needle", ["token", "pair"])
def test_retrieval_targets_are_the_needle_values(needle):
    task = _task(needle=needle)
    s, n = 64, 3
    b = task.batch(step=0, batch_size=4, seq_len=s)
    assert b.tokens.shape == b.labels.shape == (4, s)
    assert b.n_targets == 4 * n
    for toks, labs in zip(b.tokens, b.labels):
        hay = toks[: s - 3 * n]
        stored = _stored_pairs(task, hay)
        assert len(stored) == n and all(task.key0 <= k < task.key0 + task.n_keys for k in stored)
        # no stray special tokens: the haystack is filler plus exactly the needles
        assert int((hay >= task.n_filler).sum()) == n * task.width
        # the last 3n tokens: QUERY key value; the target at each key is the stored value
        tail = toks[-3 * n :].view(n, 3)
        assert (tail[:, 0] == task.query).all()
        for j, (_, key, value) in enumerate(tail.tolist()):
            assert stored[key] == value
            assert labs[s - 3 * n + 3 * j + 1] == value
        assert (labs != IGNORE).sum() == n
        where = (labs != IGNORE).nonzero().flatten()
        assert torch.equal(labs[where], toks[where + 1])  # labels are next-token targets


def test_retrieval_is_a_function_of_step_and_needles_move():
    task = _task()
    a, b = task.batch(3, 2, 128), task.batch(3, 2, 128)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
    c = task.batch(4, 2, 128)
    assert not torch.equal(a.tokens, c.tokens)
    first = lambda t: int((t[0] >= task.n_filler).nonzero()[0])
    firsts = [first(task.batch(s, 1, 512).tokens) for s in range(40)]
    assert min(firsts) < 100 and max(firsts) > 250  # needles land anywhere, not in one spot


def test_eval_stream_differs_from_training():
    task = _task()
    ev = next(task.eval_batches(2, 2, 128, seed=99))
    assert not torch.equal(ev.tokens, task.batch(0, 2, 128).tokens)
    assert sum(b.tokens.shape[0] for b in task.eval_batches(5, 2, 128, seed=99)) == 5


def test_retrieval_checks_vocab_and_length():
    with pytest.raises(ValueError, match="vocabulary"):
        RetrievalTask(n_keys=16, n_values=16, vocab_size=256)  # 256 needle tokens alone
    RetrievalTask(needle="pair", n_keys=16, n_values=16, vocab_size=256)  # pairs fit
    with pytest.raises(ValueError, match="seq_len"):
        _task().batch(0, 1, 10)
    with pytest.raises(ValueError, match="needle"):
        _task(needle="fused")
    assert _task().chance == 1 / 5


def _docs():
    return [b"hello world", b"ab", b"the quick brown fox jumps"]


def test_text_windows_pack_documents_with_cu_seqlens():
    data = TextData(_docs(), val_fraction=0.2, seed=0)
    stream = b"".join(_docs())
    tokens, labels, cu = data.window(0, 16)
    assert bytes(tokens.tolist()) == stream[:16]
    assert cu.tolist() == [0, 11, 13, 16] and cu.dtype == torch.int32
    assert labels[10] == IGNORE and labels[12] == IGNORE  # last byte of a document
    keep = [i for i in range(16) if i not in (10, 12)]
    assert bytes(labels[keep].tolist()) == bytes(stream[i + 1] for i in keep)


def test_text_cross_doc_mode_keeps_every_label():
    data = TextData(_docs(), cross_doc_attention=True)
    b = data.batch(0, 2, 8)
    assert b.cu_seqlens is None and (b.labels != IGNORE).all()


def test_text_batches_cover_training_windows_once_per_epoch():
    data = TextData([bytes(range(256))], val_fraction=0.25, seed=1)  # every byte distinct
    n_train, n_val = data._n_windows(8)
    assert (n_train, n_val) == (24, 7)  # (256 - 1) // 8 = 31 windows
    window_of = lambda row: int(row[0]) // 8
    epoch = [window_of(data.batch(s, 1, 8).tokens[0]) for s in range(n_train)]
    assert sorted(epoch) == list(range(n_train)) and epoch != sorted(epoch)  # shuffled
    val = [window_of(r) for b in data.eval_batches(100, 1, 8, seed=0) for r in b.tokens]
    assert val == list(range(n_train, n_train + n_val))  # held out, never trained on
    assert sum(len(b.tokens) for b in data.eval_batches(100, 2, 8, seed=0)) == 6  # whole batches


def test_read_documents_walks_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_bytes(b"one")
    (tmp_path / "sub" / "b.txt").write_bytes(b"two")
    (tmp_path / "empty.txt").write_bytes(b"")
    assert read_documents([str(tmp_path)]) == [b"one", b"two"]
    with pytest.raises(FileNotFoundError):
        read_documents([str(tmp_path / "missing")])


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_shard_batch_keeps_tokens_labels_positions_together(layout):
    s, cp = 16, 4
    tokens = torch.arange(100, 100 + s).expand(2, s)
    labels = tokens.roll(-1, 1)
    parts = [shard_batch(tokens, labels, layout=layout, cp_rank=r, cp=cp) for r in range(cp)]
    for tok, lab, pos in parts:
        assert tok.shape == (2, s // cp)
        assert torch.equal(tok[0], pos + 100)  # token i sits at global position i
        assert torch.equal(lab, labels[:, pos])  # and keeps its own (pre-shifted) label
    allpos = torch.cat([p for _, _, p in parts])
    assert sorted(allpos.tolist()) == list(range(s))


def test_shard_batch_positions_restart_per_document():
    s = 8
    cu = [torch.tensor([0, 3, 8], dtype=torch.int32)]
    tok = torch.arange(s)[None]
    _, _, pos = shard_batch(tok, tok, layout="zigzag", cp_rank=0, cp=2, cu_seqlens=cu)
    # zigzag rank 0 of 2 holds global tokens 0, 1, 6, 7; 6 and 7 are in the doc starting at 3
    assert pos.tolist() == [[0, 1, 3, 4]]
    assert torch.equal(
        pos[0], ringattn.positions(s, "zigzag", rank=0, world_size=2, cu_seqlens=cu[0])
    )


def test_local_doc_attention_matches_separate_documents():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 7, 4, 8, generator=g)
    k, v = torch.randn(1, 7, 2, 8, generator=g), torch.randn(1, 7, 2, 8, generator=g)
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    out = local_doc_attention(q, k, v, cu)
    from ringattn.model import sdpa_attention

    ref = torch.cat(
        [sdpa_attention(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in [(0, 4), (4, 7)]], dim=1
    )
    torch.testing.assert_close(out, ref)
