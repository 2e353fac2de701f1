"""Bad arguments to ``ringattn check`` and ``ringattn bench ...`` fail in the parent, before any
rank starts: exit code non-zero, one line naming the option and the fix, no traceback,
nothing written (``tests/cli_errors.py``)."""

from __future__ import annotations

import pytest

from tests.cli_errors import assert_clean_error, run_cli

# (argv, what the one line must contain)
CASES = [
    (
        ["check", "--seq", "1002", "--world", "4"],
        "--seq: global sequence 1002 with --layout zigzag",
    ),
    (["check", "--seq", "1002", "--world", "4"], "use 1000 or 1008"),
    (["check", "--layout", "zigzig"], "--layout: invalid choice: 'zigzig'"),
    (["check", "--world", "0"], "--world: must be a positive integer, got '0'"),
    (["check", "--seq", "-8"], "--seq: must be a positive integer, got '-8'"),
    (["check", "--dtype", "fp8"], "--dtype: invalid choice"),
    (["check", "--world", "3", "--seq", "64", "--layout", "contiguous"], "a multiple of 3"),
    (["bench", "attention", "--seq", "1002"], "--seq: global sequence 1002"),
    (["bench", "attention", "--strategy", "ringg"], "--strategy: invalid choice: 'ringg'"),
    (["bench", "attention", "--kernel", "triton"], "--kernel: invalid choice: 'triton'"),
    (["bench", "attention", "--heads", "8", "--kv-heads", "3"], "--heads 8 must be a multiple"),
    (["bench", "attention", "--strategy", "ulysses", "--heads", "6"], "--strategy ulysses"),
    (["bench", "attention", "--causal", "maybe"], "--causal: invalid choice"),
    (["bench", "attention", "--strategy", "hybrid", "--world", "2"], "--strategy hybrid needs"),
    (["bench", "attention", "--strategy", "hybrid", "--world", "4", "--heads", "3"], "even"),
    (["bench", "memory", "--plan-model", "gpt5"], "--plan-model: invalid choice: 'gpt5'"),
    (["bench", "attention", "--repeats", "0"], "--repeats: must be a positive integer"),
    (["bench", "scaling", "--world", "3", "--seq", "1000"], "--seq: global sequence 1000"),
    (["bench", "weak", "--seq-per-rank", "3"], "--seq-per-rank: global sequence"),
    (["bench", "layouts", "--layout", "snake"], "--layout: invalid choice: 'snake'"),
    (["bench", "memory", "--heads", "0"], "--heads: must be a positive integer"),
    (["bench", "peers", "--seq", "4095"], "--seq: global sequence 4095"),
    (["bench", "peers", "--seq", "1000", "--world", "8"], "--world 8 must be a multiple of 16"),
    (["bench", "peers", "--seq", "1000", "--world", "8"], "use 992 or 1008"),
    (["bench", "peers", "--dtype", "fp16"], "--dtype: invalid choice: 'fp16'"),
    (["bench", "peers", "--impls", "flash"], "--impls: invalid choice: 'flash'"),
    (["bench", "peers", "--world", "2", "0"], "--world: must be a positive integer, got '0'"),
    (["bench", "peers", "--repeats", "0"], "--repeats: must be a positive integer"),
    (["bench", "calibrate", "--world", "2", "-1"], "--world: must be a positive integer"),
    (["bench", "train", "--cp", "0"], "--cp: must be a positive integer"),
    (["bench", "train", "--cp", "4", "--seq", "1002"], "--cp 4 must be a multiple of 8"),
    (["bench", "train", "--steps", "2", "--warmup", "2"], "--warmup 2 must be >= 0 and below"),
    (["bench", "train", "--preset", "gpt5"], "--preset: invalid choice: 'gpt5'"),
    (["bench", "packed", "--seq", "1000", "--world", "8"], "--seq: global sequence 1000"),
    (["bench", "packed", "--time-seq", "100"], "--time-seq: global sequence 100"),
    (["bench", "packed", "--time-world", "0"], "--time-world: must be a positive integer"),
    (["bench", "packed", "--seeds", "0"], "--seeds: must be a positive integer"),
    (["bench", "packed", "--time-seq", "-1"], "--time-seq: must be a positive integer"),
    (["bench", "packed", "--sigma", "-1"], "use a median >= 1 token and a sigma >= 0"),
    (["bench", "all", "--bogus"], "unrecognized arguments: --bogus"),
    (["bench", "nope"], "unknown benchmark 'nope'"),
]


@pytest.mark.parametrize("argv,must", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_argument_fails_cleanly(argv, must, tmp_path):
    assert_clean_error(argv, must, cwd=tmp_path, run_dir=tmp_path / "runs")


def test_bench_all_help_runs_nothing(tmp_path):
    rc, out, err = run_cli(["bench", "all", "--help"], cwd=tmp_path)
    assert rc == 0, err
    assert "usage: ringattn bench all" in out and "--dir" in out
    assert not (tmp_path / "runs").exists()


def test_top_level_help_lists_bench_train(tmp_path):
    rc, out, _ = run_cli(["--help"], cwd=tmp_path)
    assert rc == 0 and "train|all" in out and "bench train" in out
