"""The whole training config is checked before any rank starts: every bad value below is a
ValueError naming the option, from ``load_config`` (what ``ringattn train`` and
``--print-config`` call) with no process group."""

from __future__ import annotations

import pytest

from ringattn.train.checks import check_config, seq_multiple
from ringattn.train.config import load_config, shipped_configs

# (overrides on top of the shipped demo config, text the error must contain)
BAD = [
    (["--data.seq_len=8190"], "data.seq_len=8190 is not divisible by 8"),
    (["--data.seq_len=-8192"], "data.seq_len=-8192 must be >= 1"),
    (["--data.seq_len=0"], "data.seq_len=0"),
    (["--parallel.cp=0"], "parallel.cp=0 must be >= 1"),
    (["--parallel.cp=-1"], "parallel.cp=-1"),
    (["--parallel.cp=3"], "data.curriculum[0] seq_len=128 is not divisible by 6"),
    (["--parallel.dp=0"], "parallel.dp=0"),
    (["--parallel.tp=-2"], "parallel.tp=-2"),
    (["--parallel.tp=3"], "tp=3"),
    (["--parallel.threads_per_rank=0"], "parallel.threads_per_rank=0"),
    (["--data.curriculum=[[100, 64, 10]]"], "data.curriculum[0] seq_len=100"),
    (["--data.curriculum=[[128, 64, 0]]"], "data.curriculum"),
    (["--eval.seq_len=8190"], "eval.seq_len=8190"),
    (["--eval.seq_len=-1"], "eval.seq_len=-1"),
    (["--parallel.dp=3", "--parallel.cp=1"], "data.curriculum[0] batch_size=64"),
    (["--parallel.dp=2", "--parallel.cp=2"], "data.batch_size=1 is not divisible by parallel.dp"),
    (["--eval.batch_size=5"], "eval.n_seqs=64 is not a multiple of eval.batch_size=5"),
    (["--data.batch_size=0"], "data.batch_size=0"),
    (["--train.steps=-1"], "train.steps=-1"),
    (["--train.log_every=0"], "train.log_every=0"),
    (["--optim.lr=-1"], "optim.lr=-1"),
    (["--optim.beta2=1.5"], "optim.beta2=1.5"),
    (["--data.n_pairs=9"], "data.n_pairs"),
    (["--data.n_pairs=0"], "data.n_pairs=0"),
    (["--data.curriculum=[[16, 64, 10]]"], "data.curriculum[0] seq_len=16 is too short"),
    (["--model.n_heads=3"], "model.dim=128 must be an even multiple of n_heads=3"),
    (["--model.n_kv_heads=3"], "model.n_kv_heads=3"),
    (["--model.preset=huge"], "model.preset='huge'"),
    (["--parallel.strategy=ulysses", "--parallel.cp=8"], "parallel.cp=8 must divide the heads"),
    (["--parallel.strategy=hybrid"], "parallel.ulysses=1"),
    (["--parallel.strategy=hybrid", "--parallel.ulysses=3"], "parallel.ulysses=3"),
    (["--parallel.layout=zigzig"], "parallel.layout='zigzig'"),
    (["--parallel.layout=packed"], "parallel.layout='packed' balances packed documents"),
    (["--train.dtype=fp8"], "train.dtype='fp8'"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_config_is_rejected_before_any_rank(overrides, message):
    with pytest.raises(ValueError) as err:
        load_config("demo", overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_sequence_parallel_needs_cp_times_tp():
    sp = ["--parallel.cp=2", "--parallel.tp=2", "--parallel.layout=contiguous"]
    assert seq_multiple(load_config(None, sp)) == 4  # lcm(cp, cp * tp)
    assert seq_multiple(load_config(None, sp[:2])) == 4  # zigzag: lcm(2 * cp, cp * tp)
    no_sp = [*sp, "--parallel.sequence_parallel=false"]
    assert seq_multiple(load_config(None, no_sp)) == 2
    load_config(None, [*no_sp, "--data.seq_len=1026"])
    with pytest.raises(ValueError, match=r"data.seq_len=1026 .* cp \* tp = 4"):
        load_config(None, [*sp, "--data.seq_len=1026"])


def test_world_size_must_match_the_launched_ranks():
    cfg = load_config("demo")
    check_config(cfg, world_size=4)
    with pytest.raises(ValueError, match=r"dp \* cp \* tp = 1 \* 4 \* 1 = 4 but the job has 2"):
        check_config(cfg, world_size=2)


def test_valid_configs_pass():
    for name in shipped_configs():
        load_config(name)
    load_config("demo", ["--parallel.cp=2", "--train.steps=0", "--eval.seq_len=0"])
    load_config("tiny", ["--parallel.layout=striped", "--parallel.cp=8", "--parallel.dp=1"])


def test_shipped_configs_are_the_repository_configs():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    for name, f in shipped_configs().items():
        assert (root / f"{name}.toml").read_bytes() == f.read_bytes()


def test_toml_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("[parallel\ncp = 4\n")
    with pytest.raises(ValueError, match="broken.toml: not valid TOML"):
        load_config(bad)
    with pytest.raises(ValueError, match="--config nope.toml: no such file.*demo"):
        load_config("nope.toml")
