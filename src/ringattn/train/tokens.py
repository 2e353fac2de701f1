"""``data.kind = "tokens"``: documents from a prepared token dataset, packed into sequences.

The dataset (``ringattn prepare``) is one stream of token ids, EOS after each document, and
the documents' start offsets. Packing is :class:`~ringattn.train.data.TextData`'s: sequence
``i`` is the window ``stream[i*s : (i+1)*s]`` (labels one further), windows are drawn in a
seeded random order per epoch, so batch ``i`` is a pure function of (seed, i) whatever the
dp / cp / tp degrees and across resumes. With ``cross_doc_attention = False`` each window
carries ``cu_seqlens`` (attention stays inside a document, RoPE positions restart at each
document) and the EOS of a document has no target (the next document is unrelated).

Only the memmap pages of the windows a batch uses are read: a ``(b, s)`` batch reads
``b * (s + 1)`` ids and ``O(log n_docs)`` offsets per window (a binary search), never the
whole corpus.
"""

from __future__ import annotations

import numpy as np
import torch

from ringattn.data.tokenfile import TokenFile
from ringattn.train.data import IGNORE, TextData

__all__ = ["TokenData", "check_token_dataset"]


def check_token_dataset(paths: list[str], vocab_size: int) -> TokenFile:
    """The dataset folder named by ``data.paths`` (exactly one), checked against the model."""
    if len(paths) != 1:
        raise ValueError(
            f"data.kind='tokens' needs data.paths = [one folder from `ringattn prepare`], "
            f"got {paths}"
        )
    tf = TokenFile(paths[0])
    if tf.vocab_size > vocab_size:
        raise ValueError(
            f"data.paths: {paths[0]} was tokenized with {tf.vocab_size} ids but "
            f"model.vocab_size is {vocab_size}; set --model.vocab_size={tf.vocab_size}"
        )
    return tf


class TokenData(TextData):
    """Packed documents from a :class:`TokenFile`; see the module docstring."""

    def __init__(self, tf: TokenFile, *, cross_doc_attention=False, val_fraction=0.05, seed=0):
        self.tf = tf
        self.n_stream = tf.n_tokens
        self.cross_doc = cross_doc_attention
        self.val_fraction, self.seed = val_fraction, seed
        self._perm_key: tuple[int, int] | None = None
        self._perm_val = torch.empty(0, dtype=torch.long)

    def window(self, i: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``tokens (s,)``, ``labels (s,)`` long and ``cu_seqlens`` int32 of window ``i``."""
        a = i * seq_len
        ids = torch.from_numpy(self.tf.tokens[a : a + seq_len + 1].astype(np.int64))
        tokens, labels = ids[:-1], ids[1:].clone()
        starts = self.tf.doc_starts
        lo = int(np.searchsorted(starts, a, side="right"))  # first start > a
        hi = int(np.searchsorted(starts, a + seq_len, side="left"))  # first start >= a + s
        inner = torch.from_numpy(np.asarray(starts[lo:hi]) - a)
        cu = torch.cat([torch.tensor([0]), inner, torch.tensor([seq_len])]).to(torch.int32)
        if not self.cross_doc:
            labels[inner - 1] = IGNORE  # an EOS does not predict the next document
            if hi < len(starts) and int(starts[hi]) == a + seq_len:
                labels[-1] = IGNORE
        return tokens, labels, cu
