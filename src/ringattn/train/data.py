"""Training data: a synthetic long-context retrieval task and packed byte-level text.

Every batch is a pure function of (seed, step): each rank builds the same *global* batch and
keeps its part, so resuming from a checkpoint, or with different dp / cp degrees, sees
exactly the same data. Labels are next-token targets formed on the global sequence
(``IGNORE`` where there is nothing to predict) before any sharding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["IGNORE", "Batch", "RetrievalTask", "TextData", "build_dataset", "stage_at"]

IGNORE = -100  # cross_entropy's ignore_index


@dataclass
class Batch:
    """``tokens``, ``labels``: ``(b, s)`` long; ``cu_seqlens``: None or one int32
    ``(n_docs + 1,)`` tensor per row (packed documents)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: list[torch.Tensor] | None = None

    def rows(self, start: int, stop: int) -> Batch:
        cu = None if self.cu_seqlens is None else self.cu_seqlens[start:stop]
        return Batch(self.tokens[start:stop], self.labels[start:stop], cu)

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE).sum())


def _generator(seed: int, stream: int, index: int) -> torch.Generator:
    # distinct, reproducible streams for training steps and evaluation batches
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) * 1_000_033 + index)


class RetrievalTask:
    """Key-value retrieval in a long haystack (multi-query associative recall).

    A sequence of length ``s`` is random filler with ``n_pairs`` needles at uniformly random
    places, and ends with one query ``QUERY key value`` per needle, in random order. Only
    the queried values are targets (the label at each query's key), so loss and accuracy
    measure retrieval alone: the answer is wherever the needle landed, up to ``s`` tokens
    back, on whichever cp rank holds it. Chance accuracy is ``1 / n_values``.

    Needles, ``needle=``:

    * ``"token"``: one token that encodes the pair ``(key, value)``. One attention layer
      can answer (query key -> the needle token with that key -> its value), so the tiny
      model learns it in a few hundred steps. Token ids: filler ``[0, F)``, keys, needle
      tokens (``n_keys * n_values``), values, ``QUERY``.
    * ``"pair"``: three tokens ``NEEDLE key value``: the classic induction-head task (a
      previous-token head, then a key-matching copy head); slower to learn. Token ids:
      filler, keys, values, ``NEEDLE``, ``QUERY``.
    """

    def __init__(
        self,
        *,
        needle: str = "token",
        n_pairs: int = 8,
        n_keys: int = 8,
        n_values: int = 16,
        n_filler: int = 96,
        vocab_size: int = 256,
        seed: int = 0,
    ):
        if needle not in ("token", "pair"):
            raise ValueError(f"data.needle={needle!r} is unknown; use 'token' or 'pair'")
        if n_pairs > n_keys:
            raise ValueError(
                f"data.n_pairs ({n_pairs}) must be <= data.n_keys ({n_keys}): keys are distinct"
            )
        self.needle, self.n_pairs, self.seed = needle, n_pairs, seed
        self.n_keys, self.n_values, self.n_filler = n_keys, n_values, n_filler
        self.key0 = n_filler
        if needle == "token":
            self.needle0 = self.key0 + n_keys  # needle token of (k, v): needle0 + k * V + v
            self.value0 = self.needle0 + n_keys * n_values
            self.query = self.value0 + n_values
        else:
            self.value0 = self.key0 + n_keys
            self.needle0 = self.value0 + n_values  # the NEEDLE mark
            self.query = self.needle0 + 1
        if self.query >= vocab_size:
            raise ValueError(
                f"retrieval task needs {self.query + 1} token ids (filler + keys + needles + "
                f"values + marks) but the model vocabulary is {vocab_size}; use fewer keys, "
                "values or filler tokens"
            )

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    @property
    def width(self) -> int:
        """Tokens per needle."""
        return 1 if self.needle == "token" else 3

    def min_len(self) -> int:
        return (self.width + 3) * self.n_pairs + 1

    def sample(self, batch_size: int, seq_len: int, g: torch.Generator) -> Batch:
        if seq_len < self.min_len():
            raise ValueError(f"retrieval sequences need seq_len >= {self.min_len()}")
        rows = [self._row(seq_len, g) for _ in range(batch_size)]
        return Batch(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))

    def _needle(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.needle == "token":
            return (self.needle0 + k * self.n_values + v).view(1)
        return torch.stack([torch.tensor(self.needle0), self.key0 + k, self.value0 + v])

    def _row(self, s: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n, w = self.n_pairs, self.width
        tokens = torch.randint(0, self.n_filler, (s,), generator=g)
        labels = torch.full((s,), IGNORE)
        keys = torch.randperm(self.n_keys, generator=g)[:n]
        values = torch.randint(0, self.n_values, (n,), generator=g)
        hay = s - 3 * n  # the queries take the last 3n tokens
        # n non-overlapping slots of w tokens, uniform: sorted draws, spread by w * i
        starts = torch.randperm(hay - w * n + 1, generator=g)[:n].sort().values
        starts = starts + w * torch.arange(n)
        order = torch.randperm(n, generator=g)  # which pair goes in which slot
        for i in range(n):
            j = order[i]
            tokens[starts[i] : starts[i] + w] = self._needle(keys[j], values[j])
        for i in range(n):  # queries in key-draw order, unrelated to the needle order
            p = hay + 3 * i
            value = self.value0 + values[i]
            tokens[p : p + 3] = torch.stack([torch.tensor(self.query), self.key0 + keys[i], value])
            labels[p + 1] = value  # at the key, predict its value
        return tokens, labels

    def batch(self, step: int, batch_size: int, seq_len: int) -> Batch:
        return self.sample(batch_size, seq_len, _generator(self.seed, 0, step))

    def eval_batches(
        self, n_seqs: int, batch_size: int, seq_len: int, seed: int
    ) -> Iterator[Batch]:
        """Held-out sequences: a stream disjoint from training's (different generator)."""
        for i in range(0, n_seqs, batch_size):
            yield self.sample(min(batch_size, n_seqs - i), seq_len, _generator(seed, 1, i))


# ----------------------------------------------------------------------------- text


def read_documents(paths: list[str]) -> list[bytes]:
    """One document per file; folders are walked recursively in sorted order; empty files
    are skipped."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"data.paths: {p} does not exist")
    docs = [f.read_bytes() for f in files]
    return [d for d in docs if d]


class TextData:
    """Byte-level language modelling on packed documents.

    All documents are concatenated into one stream of bytes (vocabulary 256); sequence ``i``
    is the window ``stream[i*s : (i+1)*s]`` with next-token labels from the stream. With
    ``cross_doc_attention=False`` each window carries ``cu_seqlens`` (document boundaries
    inside it, a document cut by the window edge continues as a new segment in the next
    window), positions restart per document, and the last byte of a document has no target.
    """

    def __init__(self, docs: list[bytes], *, cross_doc_attention=False, val_fraction=0.05, seed=0):
        if not docs:
            raise ValueError("TextData needs at least one non-empty document")
        self.stream = torch.frombuffer(bytearray(b"".join(docs)), dtype=torch.uint8).long()
        self.n_stream = self.stream.numel()
        lens = torch.tensor([len(d) for d in docs])
        self.doc_starts = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        self.cross_doc = cross_doc_attention
        self.val_fraction, self.seed = val_fraction, seed
        self._perm_key: tuple[int, int] | None = None
        self._perm_val = torch.empty(0, dtype=torch.long)

    def _n_windows(self, seq_len: int) -> tuple[int, int]:
        """(training windows, validation windows) of ``seq_len`` (+1 for the last label)."""
        n = (self.n_stream - 1) // seq_len
        n_val = max(1, int(n * self.val_fraction)) if n > 1 else 0
        if n - n_val < 1:
            raise ValueError(f"text data has {self.n_stream} tokens: too few for seq_len {seq_len}")
        return n - n_val, n_val

    def window(self, i: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = i * seq_len
        tokens = self.stream[a : a + seq_len]
        labels = self.stream[a + 1 : a + seq_len + 1].clone()
        inner = self.doc_starts[(self.doc_starts > a) & (self.doc_starts < a + seq_len)] - a
        cu = torch.cat([torch.tensor([0]), inner, torch.tensor([seq_len])]).to(torch.int32)
        if not self.cross_doc:
            labels[inner - 1] = IGNORE  # no target across a document boundary
            if bool((self.doc_starts == a + seq_len).any()):
                labels[-1] = IGNORE  # the next window starts a new document
        return tokens, labels, cu

    def _batch(self, idx: list[int], seq_len: int) -> Batch:
        rows = [self.window(i, seq_len) for i in idx]
        cu = None if self.cross_doc else [r[2] for r in rows]
        return Batch(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), cu)

    def batch(self, step: int, batch_size: int, seq_len: int) -> Batch:
        """Windows in a seeded random order, a fresh permutation every epoch."""
        n_train, _ = self._n_windows(seq_len)
        idx = []
        for j in range(step * batch_size, (step + 1) * batch_size):
            epoch, k = divmod(j, n_train)
            idx.append(int(self._perm(n_train, epoch)[k]))
        return self._batch(idx, seq_len)

    def _perm(self, n: int, epoch: int) -> torch.Tensor:
        if self._perm_key != (n, epoch):  # one permutation per epoch, cached
            self._perm_key = (n, epoch)
            self._perm_val = torch.randperm(n, generator=_generator(self.seed, 2, epoch))
        return self._perm_val

    def eval_batches(
        self, n_seqs: int, batch_size: int, seq_len: int, seed: int
    ) -> Iterator[Batch]:
        """The held-out windows at the end of the stream: at most ``n_seqs``, in whole
        batches (every batch must split evenly over the dp ranks)."""
        n_train, n_val = self._n_windows(seq_len)
        n = min(n_seqs, n_val) // batch_size * batch_size
        if n == 0:
            raise ValueError(
                f"text data has {n_val} held-out windows of {seq_len}: fewer than one eval "
                f"batch of {batch_size}; raise data.val_fraction or lower eval.batch_size"
            )
        idx = list(range(n_train, n_train + n))
        for i in range(0, len(idx), batch_size):
            yield self._batch(idx[i : i + batch_size], seq_len)


def build_dataset(data_cfg, vocab_size: int):
    """The dataset named by ``data_cfg.kind`` (a :class:`~ringattn.train.config.DataConfig`)."""
    if data_cfg.kind == "retrieval":  # the task's options are DataConfig fields of one name
        opts = ("needle", "n_pairs", "n_keys", "n_values", "n_filler", "seed")
        return RetrievalTask(vocab_size=vocab_size, **{k: getattr(data_cfg, k) for k in opts})
    if data_cfg.kind == "tokens":
        from ringattn.train.tokens import TokenData, check_token_dataset

        return TokenData(
            check_token_dataset(data_cfg.paths, vocab_size),
            cross_doc_attention=data_cfg.cross_doc_attention,
            val_fraction=data_cfg.val_fraction,
            seed=data_cfg.seed,
        )
    if vocab_size < 256:
        raise ValueError(f"byte-level text needs vocab_size >= 256, got {vocab_size}")
    return TextData(
        read_documents(data_cfg.paths),
        cross_doc_attention=data_cfg.cross_doc_attention,
        val_fraction=data_cfg.val_fraction,
        seed=data_cfg.seed,
    )


def stage_at(data_cfg, step: int) -> tuple[int, int]:
    """(seq_len, batch_size) at ``step`` under the curriculum, then the final shape."""
    end = 0
    for seq_len, batch_size, steps in data_cfg.curriculum:
        end += steps
        if step < end:
            return seq_len, batch_size
    return data_cfg.seq_len, data_cfg.batch_size
