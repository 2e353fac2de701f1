"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically.

Layout of ``dir``::

    step_200/          complete checkpoint: DCP shards + .metadata + trainer.json
    step_300.tmp/      a save in progress (or one a crash interrupted): never read
    latest             text file naming the newest complete checkpoint

A save writes everything into ``step_N.tmp``; only when every rank has finished does rank 0
rename it to ``step_N`` (an atomic rename on POSIX) and then replace ``latest`` (written to a
temporary file and renamed). A crash at any point leaves the previous ``step_M`` intact, and
resume only ever considers complete ``step_N`` folders.

Model and optimizer state go through ``get_state_dict`` / ``set_state_dict``, so they are
saved as DTensors with global shapes and fully-qualified names: DCP reshards on load, and a
run may resume with different dp, cp (or tp) degrees. ``trainer.json`` holds the step (which
fixes the data position: batches are a function of the step) and the config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ringattn.fsutil import write_atomic

__all__ = ["completed_steps", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

_STEP = re.compile(r"^step_(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(ckpt_dir: str | Path, step: int, model, optimizer, extra: dict, keep=2):
    """Save after ``step`` completed steps (collective: every rank calls it). Returns path."""
    root = Path(ckpt_dir)
    tmp, final = root / f"step_{step}.tmp", root / f"step_{step}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an interrupted save
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    _barrier()  # every rank's shards are on disk
    if _rank() == 0:
        write_atomic(tmp / "trainer.json", json.dumps({"step": step, **extra}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)  # the commit point
        write_atomic(root / "latest", final.name + "\n")
        for old in _complete(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _complete(root: Path) -> list[Path]:
    """Complete checkpoints in ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer.json").is_file()]


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``ckpt_dir``, or None."""
    done = _complete(Path(ckpt_dir))
    return done[-1] if done else None


def completed_steps(ckpt_dir: str | Path) -> int:
    """Steps completed by the newest complete checkpoint in ``ckpt_dir`` (0 if none); reads
    one small JSON file, so the parent process can ask before starting any rank."""
    path = latest_checkpoint(ckpt_dir)
    return int(json.loads((path / "trainer.json").read_text())["step"]) if path else 0


def load_checkpoint(path: str | Path, model, optimizer) -> dict:
    """Load model and optimizer state in place (collective); returns trainer.json."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    return json.loads((path / "trainer.json").read_text())
