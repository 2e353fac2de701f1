"""Run a function on N local ranks through PyTorch's own launcher (torch.distributed.elastic),
or as is when already launched by ``torchrun``.

``launch(fn, nprocs, *args)`` returns ``{rank: fn's return value}``. Inside ``fn`` call
:func:`init_distributed` to join the group (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import datetime
import os
import socket
import uuid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def launch(fn, nprocs: int, *args, threads_per_rank: int = 1) -> dict:
    """Start ``nprocs`` local processes running ``fn(*args)`` (``fn`` must be module-level)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nprocs,
        run_id=f"ringattn-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    os.environ["OMP_NUM_THREADS"] = str(threads_per_rank)  # inherited by the workers
    return elastic_launch(config, fn)(*args)


def init_distributed(timeout_s: float = 300.0, threads: int | None = None, device: str = "auto"):
    """Join the default group from the launcher's environment; returns (rank, world, device).

    ``device``: "auto" (CUDA + NCCL when available, else CPU + gloo), "cpu" or "cuda".
    """
    import torch
    import torch.distributed as dist

    if threads is not None:
        torch.set_num_threads(threads)
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    device = torch.device("cpu")
    kw = {}
    if cuda:
        # the device first, then the group bound to it: NCCL creates its communicators
        # eagerly on that device instead of guessing one at the first collective
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        kw["device_id"] = device
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s), **kw
        )
    return dist.get_rank(), dist.get_world_size(), device
