"""Bad command-line input to ``ringattn train``, ``ringattn demo`` and ``ringattn`` itself:
each row must fail at once (exit code non-zero, one line on stderr naming the option, no
traceback) and write nothing to the run directory. Rows run from a folder outside the
repository, so the shipped configs are found through the package.

Config checks that need no subprocess are covered row by row in test_train_checks.py.
"""

from __future__ import annotations

import pytest

from tests.cli_errors import assert_clean_error

BAD_TOML = "[parallel\ncp = 4\n"

# (argv, text the one error line must contain); {run} is the run directory, {bad} a TOML
# file that does not parse
ROWS = [
    # the examples
    (["train", "--config", "demo", "--data.seq_len=8190"], "data.seq_len=8190"),
    (["train", "--config", "demo", "--data.seq_len=-8192"], "data.seq_len=-8192"),
    (["train", "--config", "demo", "--parallel.cp=0"], "parallel.cp=0"),
    (["train", "--config", "demo", "--parallel.cp=-1"], "parallel.cp=-1"),
    (["train", "--config", "demo", "--parallel.cp=3"], "parallel.cp=3"),
    (["train", "--config", "demo", "--print-config", "--data.seq_len=-8192"], "data.seq_len"),
    (["train", "--config", "demo", "--print-config", "--parallel.cp=0"], "parallel.cp"),
    # others
    (["train", "--config", "tiny", "--parallel.layout=zigzig"], "parallel.layout='zigzig'"),
    (["train", "--config", "tiny", "--data.seq_len"], "'--data.seq_len' has no value"),
    (["train", "--config", "tiny", "--frobnicate"], "--frobnicate"),
    (["train", "--config", "no_such.toml"], "--config no_such.toml"),
    (["train", "--config", "{bad}"], "bad.toml"),
    (["train", "--config"], "--config"),
    (["demo", "--data.seq_len=8190"], "data.seq_len=8190"),
    (["demo", "--parallel.cp=0"], "parallel.cp=0"),
    (["trian"], "'trian'"),
    # every command's parser (``ringattn.cli.Parser``): the same one line, the option named
    (["plan", "--devices", "x"], "ringattn plan: argument --devices: must be a positive integer"),
    (["simulate", "--layout", "snake"], "ringattn simulate: argument --layout: invalid choice"),
    (
        ["prepare", "--tokenizer", "t", "--input", "i", "--out", "o", "--workers", "0"],
        "ringattn prepare: argument --workers: must be a positive integer, got '0'",
    ),
    (["export", "--out", "o"], "ringattn export: the following arguments are required"),
    (["plan", "--devices", "8", "--cp", "3"], "ringattn plan: dp*cp*tp = 2*3*1 != devices"),
    (["simulate", "--world", "4", "--seq", "100"], "ringattn simulate: zigzag needs seq"),
    (["plan", "--devices", "0"], "ringattn plan: argument --devices: must be a positive integer"),
    (["simulate", "--heads", "-2"], "argument --heads: must be a positive integer, got '-2'"),
    (["bench", "nope"], "ringattn bench: unknown benchmark 'nope'"),
]


@pytest.mark.parametrize("argv, must_contain", ROWS, ids=[" ".join(r[0]) for r in ROWS])
def test_bad_input_is_one_clean_line(tmp_path, argv, must_contain):
    run, bad = tmp_path / "run", tmp_path / "bad.toml"
    bad.write_text(BAD_TOML)
    argv = [a.format(bad=bad) for a in argv]
    if argv[0] in ("train", "demo"):
        argv.insert(1, f"--train.out_dir={run}")
    line = assert_clean_error(argv, must_contain, cwd=tmp_path, run_dir=run)
    assert line.startswith("ringattn")  # says which command complained


def test_demo_help_and_config_outside_the_repository(tmp_path):
    import json

    from tests.cli_errors import run_cli

    rc, out, err = run_cli(["demo", "--help"], tmp_path)
    assert rc == 0 and out.startswith("usage: ringattn demo"), out + err
    rc, out, err = run_cli(["demo", "--print-config"], tmp_path)  # the shipped demo.toml
    assert rc == 0, err
    cfg = json.loads(out)
    assert cfg["parallel"]["cp"] == 4 and cfg["data"]["seq_len"] == 8192
