"""examples/hf_finetune.py under torchrun (2 ranks, cp = 2, 2 steps) trains exactly like the
single-process transformers model: the loss before and after one optimizer step matches,
and the DCP checkpoint is written."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def _example():
    spec = importlib.util.spec_from_file_location("hf_finetune", ROOT / "examples/hf_finetune.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


def reference_losses(ex, cfg) -> list[float]:
    """The same two steps on one process: transformers' own packed-sequence mask (restarting
    positions) and its own label shift, then clip + AdamW as the example does."""
    model = ex.tiny_model(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = []
    for step in range(cfg.steps):
        ids, cu = ex.synthetic_batch(step, 0, cfg, model.config.vocab_size)
        cu = cu.tolist()
        pos = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])
        labels = ids.clone()
        labels[:, cu[1:-1]] = -100  # a document's first token is nobody's target
        # use_cache=False: with a cache, transformers skips its packed-sequence detection
        kw = dict(labels=labels, position_ids=pos.unsqueeze(0), use_cache=False)
        loss = model(input_ids=ids, **kw).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_finetune_example_two_ranks(tmp_path):
    args = ["--tiny", "--cp", "2", "--steps", "2", "--seq-len", "64", "--ckpt-dir"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    res = subprocess.run(
        [*cmd, str(ROOT / "examples/hf_finetune.py"), *args, str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src")},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = [float(x) for x in re.findall(r"step \d+ loss (\S+)", res.stdout)]
    ex = _example()
    want = reference_losses(ex, ex.parse_args(args + ["unused"]))
    assert len(got) == 2, res.stdout
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-5 * w, (got, want)
    assert got[0] != got[1]  # the step changed the weights
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_2"
