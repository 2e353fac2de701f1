"""Training config: TOML files, --section.key=value overrides, types, errors, schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ringattn.train.config import Config, load_config, parse_overrides
from ringattn.train.data import stage_at
from ringattn.train.optim import lr_at

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_without_file():
    cfg = load_config()
    assert cfg.parallel.cp == 1 and cfg.parallel.layout == "zigzag"
    assert cfg.model.build().dim == 128  # the tiny preset


def test_overrides_are_typed_from_the_dataclass():
    cfg = load_config(
        None,
        [
            "--parallel.cp=4",
            "--optim.lr=3e-3",
            "--optim.warmup_steps",
            "7",
            "--train.progress=false",
            "--parallel.layout=striped",
            "--data.curriculum=[[256, 32, 10], [1024, 8, 5]]",
            "--model.ffn_chunk=256",
            "--model.n_kv_heads=none",
            "--data.paths=a.txt,b.txt",
            "--train.out_dir=runs/x",
        ],
    )
    assert cfg.parallel.cp == 4 and isinstance(cfg.parallel.cp, int)
    assert cfg.optim.lr == pytest.approx(3e-3) and cfg.optim.warmup_steps == 7
    assert cfg.train.progress is False
    assert cfg.parallel.layout == "striped"
    assert cfg.data.curriculum == [[256, 32, 10], [1024, 8, 5]]
    assert cfg.model.build().ffn_chunk == 256
    assert cfg.model.n_kv_heads is None
    assert cfg.data.paths == ["a.txt", "b.txt"]
    assert cfg.train.out_dir == "runs/x"
    # an int given for a float field is a float
    assert isinstance(load_config(None, ["--optim.lr=1"]).optim.lr, float)


def test_toml_then_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[parallel]\ncp = 2\nlayout = "contiguous"\n[optim]\nlr = 0.01\n')
    cfg = load_config(p, ["--parallel.cp=4"])
    assert cfg.parallel.cp == 4  # the command line wins
    assert cfg.parallel.layout == "contiguous" and cfg.optim.lr == 0.01


@pytest.mark.parametrize(
    "args, match",
    [
        (["--parallel.cpp=2"], "unknown key 'cpp'.*valid keys"),
        (["--paralel.cp=2"], "unknown section"),
        (["--parallel.cp=two"], "expected an integer"),
        (["--train.progress=maybe"], "true/false"),
        (["--parallel.layout=diagonal"], "layout.*choose one of"),
        (["--data.curriculum=[[256, 32]]"], "seq_len, batch_size, steps"),
        (["parallel.cp=2"], "--section.key=value"),
        (["--model.preset=gpt5"], "preset"),
        (["--data.kind=text"], "data.paths"),
    ],
)
def test_bad_config_raises_clear_errors(args, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, args)


def test_bad_toml_key_names_the_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[optim]\nlearning_rate = 1.0\n")
    with pytest.raises(ValueError, match="bad.toml.*learning_rate"):
        load_config(p)


def test_parse_overrides_keeps_strings_that_are_not_toml():
    assert parse_overrides(["--data.paths=/tmp/a b"]) == {"data": {"paths": "/tmp/a b"}}
    assert parse_overrides(["--train.out_dir=runs/demo"]) == {"train": {"out_dir": "runs/demo"}}


def test_round_trip_through_dict():
    cfg = load_config(
        None, ["--parallel.dp=2", "--data.curriculum=[[64, 2, 3]]", "--eval.batch_size=2"]
    )
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.toml")))
def test_shipped_configs_load(name):
    load_config(CONFIGS / name)


def test_curriculum_stages():
    cfg = load_config(
        None,
        [
            "--data.curriculum=[[256, 32, 3], [1024, 8, 2]]",
            "--data.seq_len=8192",
            "--data.batch_size=1",
        ],
    )
    got = [stage_at(cfg.data, s) for s in range(7)]
    assert got == [(256, 32)] * 3 + [(1024, 8)] * 2 + [(8192, 1)] * 2


def test_lr_schedule_warmup_then_cosine():
    o = load_config(
        None, ["--optim.lr=1.0", "--optim.warmup_steps=4", "--optim.min_lr_ratio=0.1"]
    ).optim
    lrs = [lr_at(s, o, 20) for s in range(21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # monotone decay
    assert lrs[20] == pytest.approx(0.1)
    mid = 4 + (20 - 4) // 2
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_parallel_dims_checks_and_coordinates():
    from ringattn.parallel import ParallelDims

    dims = ParallelDims(dp=2, cp=2, tp=2)
    assert dims.world_size == 8 and dims.dp_cp == 4
    # tp fastest, then cp, then dp (row-major over ("dp", "cp", "tp"))
    assert [tuple(dims.coords(r).values()) for r in (0, 1, 2, 5, 7)] == [
        (0, 0, 0),
        (0, 0, 1),
        (0, 1, 0),
        (1, 0, 1),
        (1, 1, 1),
    ]
    with pytest.raises(ValueError, match=r"2 \* 2 \* 2 = 8 but the job has 4 ranks"):
        dims.check_world(4)
    with pytest.raises(ValueError, match="cp must be >= 1"):
        ParallelDims(cp=0)


def test_train_main_reports_config_errors_and_prints_config(capsys):
    import json

    from ringattn.cli import main

    assert main(["train", "--parallel.cpp=2"]) == 2
    assert "unknown key 'cpp'" in capsys.readouterr().err
    assert main(["train", "--config", str(CONFIGS / "demo.toml"), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["parallel"]["cp"] == 4 and printed["eval"]["seq_len"] >= 8192


@pytest.mark.parametrize("native", [True, False])
def test_bf16_training_computes_in_fp32_on_cpus_without_bf16_units(monkeypatch, native):
    import torch

    from ringattn.kernels import fused
    from ringattn.train.trainer import compute_dtype

    monkeypatch.setattr(fused, "cpu_half_is_native", lambda: native)
    cpu = torch.device("cpu")
    assert compute_dtype("bf16", cpu) == (torch.bfloat16 if native else torch.float32)
    assert compute_dtype("fp32", cpu) == torch.float32
    assert compute_dtype("bf16", torch.device("meta")) == torch.bfloat16
