"""``ringattn train`` as a user runs it: re-running a finished run, resuming at another cp
degree, ``train.steps = 0``, and a rank that fails. Each run is the real command in a
subprocess (the tiny model, 128 tokens, 2-4 steps), so the launcher and the console output
are the ones a user sees."""

from __future__ import annotations

import json

import pytest
import torch

from tests.cli_errors import assert_clean_error, run_cli
from tests.dist.cases_train import fit_case, tiny_config

SMALL = [
    "--config=tiny",
    "--data.seq_len=128",
    "--eval.seq_len=128",
    "--eval.n_seqs=4",
    "--checkpoint.every=2",
    "--train.plot=false",
]


def _train(run, *extra) -> tuple[int, str, str]:
    return run_cli(["train", *SMALL, f"--train.out_dir={run}", *extra], run.parent, 300)


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run of 2 steps at dp = 2 x cp = 2 (tiny.toml's degrees), checkpointed at step 2."""
    run = tmp_path_factory.mktemp("rerun") / "run"
    rc, out, err = _train(run, "--train.steps=2")
    assert rc == 0, err
    assert (run / "checkpoints" / "step_2").is_dir()
    return run


@pytest.mark.parametrize(
    "degrees", [[], ["--parallel.cp=4", "--parallel.dp=1"]], ids=["same", "cp4"]
)
def test_rerunning_a_finished_run_does_nothing(finished, degrees):
    log = (finished / "metrics.jsonl").read_text()
    rc, out, err = _train(finished, "--train.steps=2", *degrees)
    assert rc == 0, err
    assert "nothing to do" in out and "completed 2 steps" in out and "--train.steps" in out
    assert "Traceback" not in out + err
    assert (finished / "metrics.jsonl").read_text() == log  # untouched
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == ["latest", "step_2"]


def test_zero_steps_is_valid_and_does_nothing(tmp_path):
    rc, out, err = _train(tmp_path / "run", "--train.steps=0")
    assert rc == 0, err
    assert out.strip() == "nothing to do: train.steps=0 (pass --train.steps=N to train N steps)"
    assert not (tmp_path / "run").exists()


def test_more_steps_resume_at_a_new_cp_degree(finished):
    # runs after the tests above (file order): the finished run, now asked for 4 steps at cp=4
    rc, out, err = _train(finished, "--train.steps=4", "--parallel.cp=4", "--parallel.dp=1")
    assert rc == 0, err
    assert f"resumed from step 2 ({finished / 'checkpoints'})" in out
    assert "done: 4 steps (2 in this run)" in out
    rows = _rows(finished)
    train = [r["step"] for r in rows if "loss" in r]
    assert train == [1, 2, 3, 4]  # steps 1-2 kept from the first run, 3-4 appended
    # the log ends at the step the console ended at
    console_steps = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert console_steps[-1].startswith("step 4/4 |")
    assert rows[-1]["step"] == 4 and "eval_acc" in rows[-1]
    assert "eval after step 4:" in out
    assert (finished / "checkpoints" / "latest").read_text().strip() == "step_4"


def test_a_failing_rank_is_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    run = tmp_path / "run"
    argv = ["train", *SMALL, f"--train.out_dir={run}", "--data.kind=text", f"--data.paths={empty}"]
    line = assert_clean_error(argv, "ValueError: TextData needs at least one", tmp_path, run)
    assert line.startswith("ringattn train: rank ") and "failed: ValueError" in line


def test_trainer_resumed_past_its_steps_returns_without_training(pools, tmp_path):
    # the path under torchrun, where no parent checks the checkpoint first
    ckpt = {"enabled": True, "every": 2, "dir": str(tmp_path / "ckpt")}
    cfg = tiny_config(str(tmp_path), parallel={"cp": 4}, train={"steps": 2}, checkpoint=ckpt)
    first = pools(4).run(fit_case, cfg, timeout=240)[0]
    assert first["steps"] == 2 and len(first["losses"]) == 2
    log = (tmp_path / "metrics.jsonl").read_text()
    again = pools(4).run(fit_case, cfg, timeout=240)[0]
    assert again["nothing_to_do"] and again["steps"] == 2 and again["losses"] == []
    assert (tmp_path / "metrics.jsonl").read_text() == log
    for name, p in first["params"].items():
        torch.testing.assert_close(again["params"][name], p, rtol=0, atol=0, msg=name)


def test_ctrl_c_of_the_command_is_one_line(tmp_path):
    # SIGINT to the command itself (as `kill -INT`): the launcher stops the ranks, the
    # command says so in one line, exit 130
    import os
    import signal
    import subprocess
    import sys

    from tests.cli_errors import ROOT

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    argv = [*SMALL, "--train.steps=500", "--train.log_every=1", f"--train.out_dir={tmp_path}"]
    p = subprocess.Popen(
        [sys.executable, "-m", "ringattn.cli", "train", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        for line in p.stdout:
            if line.startswith("step 2/500"):  # the ranks are training
                break
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130
    assert err.strip() == "ringattn train: interrupted"
