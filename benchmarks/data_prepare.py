"""Throughput of ``ringattn prepare`` and the cost of reading one training batch.

    python benchmarks/data_prepare.py --mb 200 --workers 2 --out /tmp/prep_bench

1. Generates a corpus of ``--mb`` MB: ``--files`` .jsonl files of word-salad documents
   (Zipf-distributed words from a 20K-word vocabulary, 200-4000 words each) — the shape of a
   web corpus, not its statistics.
2. Trains a byte-level BPE tokenizer (``--vocab`` ids) on the first ~4 MB.
3. Runs :func:`ringattn.data.prepare_dataset` (``--workers`` processes) and prints MB/s and
   tokens/s of that call alone (corpus generation and tokenizer training excluded).
4. Times ``TokenData.batch(step, batch, seq_len)`` — exactly what every rank calls per step
   — for ``--steps`` random steps at ``--seq-len`` (default 32K) from the memmap.

Prints one JSON row. Compare the batch time with the trainer's step time at the same
context (``ringattn train ... --data.kind=tokens``; its metrics.jsonl ``step_time``).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import time
from pathlib import Path

from ringattn.data import PrepareConfig, TokenFile, prepare_dataset
from ringattn.train.tokens import TokenData


def generate(folder: Path, mb: float, n_files: int, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    words = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
        for _ in range(20000)
    ]
    weights = [1.0 / (i + 1) for i in range(len(words))]  # Zipf
    folder.mkdir(parents=True, exist_ok=True)
    per_file = mb * 1e6 / n_files
    files = []
    for j in range(n_files):
        path = folder / f"part{j:03d}.jsonl"
        size = 0
        with open(path, "w") as f:
            while size < per_file:
                text = " ".join(rng.choices(words, weights, k=rng.randint(200, 4000)))
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                size += len(line)
        files.append(path)
    return files


def train_tokenizer(files: list[Path], vocab: int, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    sample = []
    with open(files[0]) as f:
        for line in f:
            sample.append(json.loads(line)["text"])
            if sum(map(len, sample)) > 4e6:
                break
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(sample, trainer)
    tok.save(str(out))
    return out


def _cpu_s() -> float:
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=200.0)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="/tmp/prep_bench")
    a = ap.parse_args()
    root = Path(a.out)
    files = sorted((root / "corpus").glob("*.jsonl"))
    if not files:  # the corpus is kept between runs
        files = generate(root / "corpus", a.mb, a.files)
    tok = train_tokenizer(files, a.vocab, root / "tokenizer.json")
    shutil.rmtree(root / "ds", ignore_errors=True)
    cfg = PrepareConfig(str(tok), [str(f) for f in files], str(root / "ds"), workers=a.workers)
    cfg.quiet = True
    cpu0 = _cpu_s()
    m = prepare_dataset(cfg)
    cpu = _cpu_s() - cpu0  # this process + its (finished) pool workers
    data = TokenData(TokenFile(root / "ds"), seed=0)
    times = []
    for step in random.Random(1).sample(range(10_000), a.steps):
        t0 = time.perf_counter()
        data.batch(step, a.batch, a.seq_len)
        times.append(time.perf_counter() - t0)
    row = {
        "mb": round(m["bytes"] / 1e6, 1),
        "files": len(files),
        "workers": a.workers,
        "n_tokens": m["n_tokens"],
        "n_docs": m["n_docs"],
        "prepare_s": round(m["seconds"], 2),
        "mb_per_s": round(m["bytes"] / 1e6 / m["seconds"], 2),
        "tokens_per_s": round(m["n_tokens"] / m["seconds"]),
        "cpu_s": round(cpu, 2),  # on a shared machine wall time hides the real cost
        "mb_per_cpu_s": round(m["bytes"] / 1e6 / cpu, 2),
        "seq_len": a.seq_len,
        "batch": a.batch,
        "batch_ms_median": round(1e3 * statistics.median(times), 3),
        "batch_ms_max": round(1e3 * max(times), 3),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
