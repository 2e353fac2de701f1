"""``ringattn prepare``: tokenize documents from files into a :class:`TokenFile` dataset.

Inputs: ``.txt`` (and any other suffix: the whole file is one document), ``.jsonl`` (one
document per line, a string field, ``text`` by default) and ``.parquet`` (a string column;
needs pyarrow). Folders are walked recursively in sorted order. Every document gets the
tokenizer's EOS id appended.

How it stays safe and bounded:

* Streaming: a file is read in pieces of ~``chunk_bytes`` (lines for text, batches of rows
  for jsonl / parquet) and its ids are appended to its shard file as they come, so memory
  does not grow with the corpus.
* Parallel: one task per input file in a process pool (``workers``).
* Resumable: each file becomes one shard in ``OUT.partial/``; a shard is written under a
  ``.tmp`` name and renamed, then its ``.json`` marker is written last, so after a crash or
  Ctrl-C a re-run skips exactly the finished files. Shard names hash the file's path, size
  and mtime: an edited input is tokenized again.
* Atomic: the final dataset is assembled in ``OUT.tmp/`` (manifest last) and renamed to
  ``OUT``; ``OUT.partial/`` is removed only after that.
* A bad input (unreadable, empty, not UTF-8, bad JSON, missing field) is a one-line
  ``ValueError`` naming the file, and the partial work is removed: nothing is left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np

from ringattn.data.tokenfile import FORMAT, token_dtype
from ringattn.fsutil import write_atomic

__all__ = ["PrepareConfig", "expand_inputs", "find_eos", "prepare_dataset"]

EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[EOS]", "<|eos|>")


@dataclass
class PrepareConfig:
    tokenizer: str  # a tokenizer.json (the `tokenizers` library's format)
    inputs: list[str] = field(default_factory=list)  # files or folders
    out: str = ""
    text_field: str = "text"  # jsonl key / parquet column
    eos: str | None = None  # EOS token string; None -> the first of EOS_CANDIDATES present
    workers: int = 1  # processes; 1 -> tokenize in this process
    chunk_bytes: int = 1 << 20  # text read per encode call
    quiet: bool = False  # no progress bar (it is also off when stderr is not a terminal)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """The input files, folders expanded recursively (sorted, hidden files skipped)."""
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file())
            files += [
                f for f in found if not any(x.startswith(".") for x in f.relative_to(p).parts)
            ]
        elif p.exists():
            files.append(p)
        else:
            raise ValueError(f"--input {p}: no such file or folder")
    if not files:
        raise ValueError(f"--input {' '.join(inputs)}: no files to tokenize")
    return files


def _load_tokenizer(path: str):
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - the `data` extra
        raise ValueError(
            "ringattn prepare needs `tokenizers`: pip install 'ringattn[data]'"
        ) from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
        raise ValueError(f"--tokenizer {path}: cannot load a tokenizer.json ({e})") from None


def find_eos(tok, eos: str | None) -> int:
    """The EOS id: the token ``eos`` if given, else the first known EOS string present."""
    for name in [eos] if eos else EOS_CANDIDATES:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    want = repr(eos) if eos else f"any of {', '.join(EOS_CANDIDATES)}"
    raise ValueError(f"the tokenizer has no EOS token ({want}); pass --eos TOKEN")


# ----------------------------------------------------------------------------- reading


def _text_pieces(path: Path, chunk: int) -> Iterator[tuple[list[str], bool]]:
    """(pieces, ends_document): the whole file is one document, read in line-aligned pieces
    of ~``chunk`` characters (a piece ends on a line break, so no word is cut)."""
    with open(path, encoding="utf-8", errors="strict", newline="") as f:
        buf: list[str] = []
        size = 0
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= chunk:
                yield ["".join(buf)], False
                buf, size = [], 0
        yield ["".join(buf)], True


def _jsonl_docs(path: Path, key: str, batch: int) -> Iterator[list[str]]:
    with open(path, encoding="utf-8", errors="strict") as f:
        docs: list[str] = []
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[key]
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            except (KeyError, TypeError):
                raise ValueError(f"{path}:{n}: no field {key!r} (set --text-field)") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: field {key!r} is not a string")
            docs.append(text)
            if len(docs) == batch:
                yield docs
                docs = []
        if docs:
            yield docs


def _parquet_docs(path: Path, key: str, batch: int) -> Iterator[list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    pf = pq.ParquetFile(path)
    if key not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {key!r} (set --text-field)")
    for rb in pf.iter_batches(batch_size=batch, columns=[key]):
        yield [t for t in rb.column(0).to_pylist() if t is not None]


def _encoded(
    path: Path, cfg: PrepareConfig, tok, eos: int
) -> Iterator[tuple[np.ndarray, list[int]]]:
    """(ids, lengths) per piece of ``path``: ``lengths`` of the documents that end in this
    piece, EOS included; ids after ``sum(lengths)`` belong to a document that continues."""
    suffix = path.suffix.lower()
    # encode_batch_fast (tokenizers >= 0.21) skips character offsets: ~15% faster here
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    if suffix in (".jsonl", ".parquet"):
        batch = max(1, cfg.chunk_bytes // 4096)  # ~4 KB documents per encode call
        reader = _jsonl_docs if suffix == ".jsonl" else _parquet_docs
        for docs in reader(path, cfg.text_field, batch):
            encs = encode(docs, add_special_tokens=False)
            ids = [np.append(np.asarray(e.ids, dtype=np.int64), eos) for e in encs]
            if ids:
                yield np.concatenate(ids), [a.size for a in ids]
        return
    for pieces, ends in _text_pieces(path, cfg.chunk_bytes):
        ids = np.asarray(encode(pieces, add_special_tokens=False)[0].ids, np.int64)
        yield (np.append(ids, eos), [ids.size + 1]) if ends else (ids, [])


# ----------------------------------------------------------------------------- shards


def shard_name(index: int, path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    return f"{index:06d}-{hashlib.sha1(key).hexdigest()[:12]}"


def tokenize_file(cfg: PrepareConfig, path: Path, shard: Path, vocab: int, eos: int) -> dict:
    """Tokenize one file into ``shard.tokens`` / ``shard.docs`` (document lengths, int64),
    then write the ``shard.json`` marker. Runs in a worker process."""
    tok = _load_tokenizer(cfg.tokenizer)
    dtype = token_dtype(vocab)
    tmp_t, tmp_d = shard.with_suffix(".tokens.tmp"), shard.with_suffix(".docs.tmp")
    n_tokens = n_docs = 0
    try:
        with open(tmp_t, "wb") as ft, open(tmp_d, "wb") as fd:
            carry = 0  # tokens of a document that began in an earlier piece
            for ids, lens in _encoded(path, cfg, tok, eos):
                ids.astype(dtype).tofile(ft)
                n_tokens += ids.size
                rest = ids.size - sum(lens)
                if lens:
                    lens[0] += carry
                    np.asarray(lens, dtype=np.int64).tofile(fd)
                    n_docs, carry = n_docs + len(lens), rest
                else:
                    carry += rest
            for f in (ft, fd):
                f.flush()
                os.fsync(f.fileno())
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} near byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    if n_tokens <= n_docs:  # nothing but EOS: no text at all
        raise ValueError(f"{path}: empty (no text to tokenize)")
    os.replace(tmp_t, shard.with_suffix(".tokens"))
    os.replace(tmp_d, shard.with_suffix(".docs"))
    done = {"file": str(path), "n_tokens": n_tokens, "n_docs": n_docs, "bytes": path.stat().st_size}
    write_atomic(shard.with_suffix(".json"), json.dumps(done))  # the commit point
    return done


# ----------------------------------------------------------------------------- driver


class _Progress:
    """One ``\\r``-updated line on stderr: files, MB, MB/s. Silent unless stderr is a tty."""

    def __init__(self, total_bytes: int, n_files: int, quiet: bool):
        self.on = not quiet and sys.stderr.isatty()
        self.total, self.n_files = total_bytes, n_files
        self.bytes = self.files = 0
        self.t0 = time.perf_counter()

    def update(self, n_bytes: int) -> None:
        self.bytes += n_bytes
        self.files += 1
        if self.on:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            pct = 100 * self.bytes / max(self.total, 1)
            print(
                f"\rprepare: {pct:5.1f}% {self.files}/{self.n_files} files "
                f"{self.bytes / 1e6:.1f}/{self.total / 1e6:.1f} MB "
                f"{self.bytes / 1e6 / dt:.1f} MB/s",
                end="\n" if self.files == self.n_files else "",
                file=sys.stderr,
                flush=True,
            )


def _job(cfg: PrepareConfig, files: list[Path], tok_sha: str) -> dict:
    return {
        "inputs": [str(f.resolve()) for f in files],
        "tokenizer_sha256": tok_sha,
        "text_field": cfg.text_field,
        "eos": cfg.eos,
    }


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_dataset(cfg: PrepareConfig) -> dict:
    """Tokenize ``cfg.inputs`` into the dataset folder ``cfg.out``; returns its manifest
    plus ``seconds`` and ``resumed_files`` (shards a previous, interrupted run finished)."""
    out = Path(cfg.out)
    if not cfg.out:
        raise ValueError("--out DIR is required")
    if (out / "manifest.json").exists():
        raise ValueError(f"--out {out}: a dataset already exists there; remove it or pick another")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty folder")
    files = expand_inputs(cfg.inputs)
    tok = _load_tokenizer(cfg.tokenizer)
    vocab, eos = tok.get_vocab_size(with_added_tokens=True), find_eos(tok, cfg.eos)
    partial = out.with_name(out.name + ".partial")
    job = _job(cfg, files, _sha256(cfg.tokenizer))
    if partial.is_dir() and _read_json(partial / "job.json") != job:
        shutil.rmtree(partial)  # another job's leftovers: nothing reusable
    (partial / "shards").mkdir(parents=True, exist_ok=True)
    write_atomic(partial / "job.json", json.dumps(job))
    t0 = time.perf_counter()
    try:
        shards = [partial / "shards" / shard_name(i, f) for i, f in enumerate(files)]
        todo = [(f, s) for f, s in zip(files, shards) if _read_json(s.with_suffix(".json")) is None]
        progress = _Progress(sum(f.stat().st_size for f, _ in todo), len(todo), cfg.quiet)
        _run(cfg, todo, vocab, eos, progress)
        manifest = _assemble(cfg, out, files, shards, vocab, eos, job)
    except (ValueError, OSError) as e:
        shutil.rmtree(partial, ignore_errors=True)  # a bad input: leave nothing behind
        shutil.rmtree(out.with_name(out.name + ".tmp"), ignore_errors=True)
        raise ValueError(str(e)) from None
    shutil.rmtree(partial, ignore_errors=True)
    return {
        **manifest,
        "seconds": time.perf_counter() - t0,
        "resumed_files": len(files) - len(todo),
    }


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run(cfg: PrepareConfig, todo, vocab: int, eos: int, progress: _Progress) -> None:
    if cfg.workers <= 1 or len(todo) <= 1:
        for f, s in todo:
            progress.update(tokenize_file(cfg, f, s, vocab, eos)["bytes"])
        return
    # fork where there is one: a spawned worker would re-import torch (ringattn's package
    # init), seconds per worker; the parent has not run the tokenizer yet, so no thread pool
    # of its is forked half-way (the known tokenizers-after-fork deadlock)
    ctx = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(min(cfg.workers, len(todo)), mp_context=ctx) as pool:
        futures = [pool.submit(tokenize_file, cfg, f, s, vocab, eos) for f, s in todo]
        try:
            for fut in as_completed(futures):
                progress.update(fut.result()["bytes"])
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _assemble(cfg, out: Path, files, shards, vocab: int, eos: int, job: dict) -> dict:
    """Concatenate the shards into ``OUT.tmp`` (streaming), manifest last, rename to OUT."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n_tokens = n_docs = 0
    with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "docs.bin", "wb") as fd:
        np.zeros(1, np.int64).tofile(fd)
        for s in shards:
            with open(s.with_suffix(".tokens"), "rb") as src:
                shutil.copyfileobj(src, ft, 1 << 22)
            lens = np.fromfile(s.with_suffix(".docs"), dtype=np.int64)
            (n_tokens + np.cumsum(lens)).tofile(fd)
            n_tokens, n_docs = n_tokens + int(lens.sum()), n_docs + lens.size
        for f in (ft, fd):
            f.flush()
            os.fsync(f.fileno())
    manifest = {
        "format": FORMAT,
        "dtype": token_dtype(vocab).str,
        "n_tokens": n_tokens,
        "n_docs": n_docs,
        "vocab_size": vocab,
        "eos_id": eos,
        "tokenizer": str(Path(cfg.tokenizer).resolve()),
        "bytes": sum(f.stat().st_size for f in files),
        **job,
        "config": asdict(cfg),
    }
    write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1))  # written last
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()  # checked empty above
    os.rename(tmp, out)  # the commit point
    return manifest
