"""The on-disk token dataset that ``ringattn prepare`` writes and the trainer memory-maps.

Layout of a dataset folder::

    tokens.bin      all documents' token ids back to back, EOS after each; uint16 when the
                    vocabulary fits (<= 65536 ids), else uint32; little-endian, no header
    docs.bin        int64 ``(n_docs + 1,)``: document start offsets into tokens.bin, then
                    the total token count (a ``cu_seqlens`` over the whole corpus)
    manifest.json   dtype, counts, vocabulary, EOS id, tokenizer hash, inputs. Written last:
                    a folder without it is not a dataset (prepare renames a complete
                    temporary folder into place, so a crash never leaves one half-written)

Opening reads only the manifest; both arrays are ``numpy.memmap``, so a reader touches only
the pages of the windows it slices.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["FORMAT", "TokenFile", "token_dtype"]

FORMAT = "ringattn-tokens/1"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype for ids ``< vocab_size``."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class TokenFile:
    """A prepared dataset, memory-mapped: ``tokens`` ``(n_tokens,)``, ``doc_starts``
    ``(n_docs + 1,)`` int64."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise ValueError(
                f"{self.path}: not a prepared token dataset (no manifest.json); "
                "create it with `ringattn prepare`"
            )
        meta = json.loads(manifest.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{self.path}: format {meta.get('format')!r}, expected {FORMAT}")
        self.meta = meta
        self.vocab_size, self.eos_id = int(meta["vocab_size"]), int(meta["eos_id"])
        self.n_tokens, self.n_docs = int(meta["n_tokens"]), int(meta["n_docs"])
        dtype = np.dtype(meta["dtype"])
        for name, n, dt in (
            ("tokens.bin", self.n_tokens, dtype),
            ("docs.bin", self.n_docs + 1, "<i8"),
        ):
            size = (self.path / name).stat().st_size if (self.path / name).is_file() else -1
            if size != n * np.dtype(dt).itemsize:
                raise ValueError(f"{self.path / name}: {size} bytes, the manifest says {n} x {dt}")
        self.tokens = np.memmap(self.path / "tokens.bin", dtype=dtype, mode="r")
        self.doc_starts = np.memmap(self.path / "docs.bin", dtype="<i8", mode="r")

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (its EOS included)."""
        return np.asarray(self.tokens[self.doc_starts[i] : self.doc_starts[i + 1]])
