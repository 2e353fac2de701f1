"""``ringattn prepare`` (documents -> token dataset) and ``ringattn export`` (checkpoint ->
Hugging Face folder). Argument errors are one-line ``ValueError``s (exit 2 in ``ringattn``)."""

from __future__ import annotations

import argparse

from ringattn.cli import Parser, positive

__all__ = ["export_main", "prepare_main"]


def prepare_main(argv: list[str]) -> int:
    from ringattn.data.prepare import PrepareConfig, prepare_dataset

    ap = Parser(
        prog="ringattn prepare",
        allow_abbrev=False,
        description="Tokenize .txt / .jsonl / .parquet documents into a memory-mapped token "
        "dataset for `ringattn train --data.kind=tokens --data.paths=[DIR]`. Re-run the same "
        "command after an interruption: finished files are kept.",
    )
    ap.add_argument("--tokenizer", required=True, help="a tokenizer.json (`tokenizers` format)")
    ap.add_argument("--input", nargs="+", required=True, help="files or folders")
    ap.add_argument("--out", required=True, help="the dataset folder to create")
    ap.add_argument("--text-field", default="text", help="jsonl key / parquet column")
    ap.add_argument("--eos", default=None, help="EOS token (default: </s>, <|endoftext|> ...)")
    ap.add_argument("--workers", type=positive, default=1, help="processes (one file each)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    cfg = PrepareConfig(a.tokenizer, a.input, a.out, a.text_field, a.eos, a.workers, quiet=a.quiet)
    m = prepare_dataset(cfg)
    mb, dt = m["bytes"] / 1e6, max(m["seconds"], 1e-9)
    resumed = f", {m['resumed_files']} files kept from an interrupted run" * bool(
        m["resumed_files"]
    )
    print(
        f"wrote {a.out}: {m['n_tokens']:,} tokens ({m['dtype']}), {m['n_docs']:,} documents, "
        f"vocab {m['vocab_size']}, eos {m['eos_id']}; {mb:.1f} MB in {dt:.1f} s "
        f"({mb / dt:.1f} MB/s, {m['n_tokens'] / dt:,.0f} tokens/s){resumed}"
    )
    return 0


def export_main(argv: list[str]) -> int:
    from ringattn.export import export_hf

    ap = Parser(
        prog="ringattn export",
        allow_abbrev=False,
        description="Write a training checkpoint (saved at any dp/cp/tp) as a Hugging Face "
        "LlamaForCausalLM folder: config.json + model.safetensors.",
        formatter_class=argparse.HelpFormatter,
    )
    ap.add_argument("--checkpoint", required=True, help="step_N folder or checkpoint folder")
    ap.add_argument("--out", required=True, help="the folder to create")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json to copy alongside")
    a = ap.parse_args(argv)
    out = export_hf(a.checkpoint, a.out, a.tokenizer)
    print(f"wrote {out}: load it with transformers.LlamaForCausalLM.from_pretrained({str(out)!r})")
    return 0
