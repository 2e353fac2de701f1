"""Run a function on N local ranks through PyTorch's own launcher (torch.distributed.elastic),
or as is when already launched by ``torchrun``.

``launch(fn, nprocs, *args)`` returns ``{rank: fn's return value}``. Inside ``fn`` call
:func:`init_distributed` to join the group (gloo on CPU, NCCL on CUDA).

When a rank fails, ``launch`` raises :class:`RankError` carrying that rank's one-line error
(``ValueError: ...``) instead of the launcher's ``ChildFailedError``, and the launcher's own
log of the failure (dozens of lines around the rank's traceback) is dropped; on success, or
any other failure, that log is shown as usual. ``ringattn.cli.main`` prints a RankError as
one line for every subcommand.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import uuid

__all__ = ["RankError", "init_distributed", "launch", "under_torchrun"]

# Loggers of torch's elastic launcher and of the spawned-process watcher it uses.
_LAUNCHER_LOGGERS = (
    "torch.distributed.elastic",
    "torch.distributed.launcher",
    "torch.multiprocessing",
)


class RankError(RuntimeError):
    """A rank started by :func:`launch` failed. ``rank``: the first rank that raised (or
    died); ``message``: its error as one line, e.g. ``"ValueError: data.seq_len ..."``;
    ``traceback``: the rank's Python traceback when it raised (else "")."""

    def __init__(self, rank: int, message: str, traceback: str = ""):
        self.rank, self.message, self.traceback = rank, message, traceback
        super().__init__(f"rank {rank} failed: {message}")


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
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    with _held_logs(_LAUNCHER_LOGGERS) as held:
        try:
            return elastic_launch(config, fn)(*args)
        except ChildFailedError as e:
            held.clear()  # the launcher's account of it; the RankError says it in one line
            raise _rank_error(e) from None
        except SignalException as e:  # Ctrl-C (or SIGTERM) here: the launcher stopped the ranks
            held.clear()
            raise KeyboardInterrupt(str(e)) from None


def _rank_error(e) -> RankError:
    """The RankError of the rank that failed first, preferring one that raised a Python
    exception over ranks the launcher then terminated."""

    def info(rank, failure):
        data = failure.message  # a dict read from the rank's error file, or a plain string
        if isinstance(data, dict):
            extra = data.get("extraInfo") or {}
            return rank, str(data.get("message", "")), extra.get("py_callstack", "")
        return rank, f"exited with code {failure.exitcode}: {data}", ""

    found = sorted(e.failures.items(), key=lambda kv: kv[1].timestamp)
    rank, message, tb = max(
        (info(r, f) for r, f in found), key=lambda t: bool(t[2]), default=(-1, str(e), "")
    )
    return RankError(rank, " ".join(message.split()), tb)


class _Held(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def clear(self) -> None:
        self.records = []


@contextlib.contextmanager
def _held_logs(names: tuple[str, ...]):
    """Hold back the records of loggers ``names`` while inside; replay whatever is left in
    the yielded holder on exit (``holder.clear()`` drops them)."""
    held, loggers = _Held(), [logging.getLogger(n) for n in names]
    propagate = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.addHandler(held)
        lg.propagate = False
    try:
        yield held
    finally:
        for lg, p in zip(loggers, propagate):
            lg.removeHandler(held)
            lg.propagate = p
        for record in held.records:
            logging.getLogger(record.name).handle(record)


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
