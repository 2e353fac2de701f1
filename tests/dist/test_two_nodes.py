"""Two "nodes" with PyTorch's real launcher: ``torchrun --nnodes=2 --nproc-per-node=2`` started
twice on 127.0.0.1, meeting through c10d rendezvous, train the tiny model at cp = 4 (the
ring spans both nodes) on gloo. Their losses must be those of the same run on one node
(the same Trainer on the 4-rank worker pool), which ``test_train.py`` compares with one
process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import torch
from torch.distributed import TCPStore

from tests.cli_errors import ROOT, run_cli
from tests.dist.cases_train import fit_case
from tests.dist.pool import free_port

ARGS = [
    "--config=tiny",
    "--parallel.dp=1",
    "--parallel.cp=4",
    "--data.seq_len=128",
    "--eval.seq_len=128",
    "--eval.n_seqs=4",
    "--train.steps=3",
    "--train.plot=false",
    "--train.progress=false",
]


def _losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _two_nodes(run) -> None:
    # The rendezvous store lives in this process, not in one of the agents: an agent that
    # hosts it and exits first takes it away from the other agent, which may still be
    # polling it (RendezvousConnectionError, exit code 1) although every worker succeeded.
    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    endpoint = f"127.0.0.1:{port}"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        "--rdzv-conf=is_host=false",
        f"--rdzv-id=two-nodes-{uuid.uuid4().hex[:8]}",
        "--local-addr=127.0.0.1",
        "-m",
        "ringattn.cli",
        "train",
        *ARGS,
        f"--train.out_dir={run}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    nodes = [
        subprocess.Popen(
            launcher,
            cwd=run.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outs = [n.communicate(timeout=240)[0] for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
        del store
    for n, out in zip(nodes, outs, strict=True):
        assert n.returncode == 0, out[-3000:]
        assert "RendezvousConnectionError" not in out, out[-3000:]


def _config(run) -> dict:
    """The config ``ringattn train *ARGS`` resolves to, as a dict."""
    rc, out, err = run_cli(["train", *ARGS, f"--train.out_dir={run}", "--print-config"], ROOT)
    assert rc == 0, err
    return json.loads(out)


@pytest.mark.slow
def test_two_torchrun_nodes_match_one_node(pools, tmp_path):
    two = tmp_path / "two_nodes"
    _two_nodes(two)
    # the same config on one node: the trainer on the 4-rank worker pool
    one = pools(4).run(fit_case, _config(tmp_path / "one_node"), timeout=120)[0]
    got = _losses(two)
    assert len(got) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(one["losses"]), rtol=2e-5, atol=0)
