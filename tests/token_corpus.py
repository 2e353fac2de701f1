"""A tiny corpus and a WordLevel tokenizer trained on it in the test (no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

EOS = "</s>"


def documents(n: int = 40, seed: int = 0) -> list[str]:
    """``n`` documents of 3-40 words from a 60-word vocabulary, several lines each."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(60)]
    docs = []
    for _ in range(n):
        lines = [
            " ".join(rng.choices(words, k=rng.randint(1, 8))) for _ in range(rng.randint(3, 5))
        ]
        docs.append("\n".join(lines))
    return docs


def tokenizer(folder: Path, docs: list[str]) -> Path:
    """Train a WordLevel tokenizer on ``docs``; returns its tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(docs, trainers.WordLevelTrainer(special_tokens=["[UNK]", EOS]))
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


def write_corpus(folder: Path, docs: list[str]) -> list[Path]:
    """The first 4 documents as .txt files (one document each), the rest in two .jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, d in enumerate(docs[:4]):
        files.append(folder / f"doc{i}.txt")
        files[-1].write_text(d)
    rest = docs[4:]
    for j, part in enumerate((rest[: len(rest) // 2], rest[len(rest) // 2 :])):
        files.append(folder / f"part{j}.jsonl")
        files[-1].write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    return files


def expected_ids(tok_path: Path, docs: list[str]) -> list[list[int]]:
    """Each document's ids plus EOS, straight from the tokenizer (the reference)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id(EOS)
    return [tok.encode(d, add_special_tokens=False).ids + [eos] for d in docs]
