"""A pool of real gloo processes on 127.0.0.1, reused across test cases.

Each world size gets W spawned workers (1 thread each) that join one gloo group once and then
run test functions sent to them. Arguments and results travel as ``torch.save`` bytes. A case
that fails on some ranks only, or times out, may leave P2P operations unmatched, so the pool is
torn down and rebuilt (never reuse a group after a failure).
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(b: bytes):
    return torch.load(io.BytesIO(b), weights_only=False)


def _worker(rank: int, world: int, port: int, pg_timeout: float, inq, outq) -> None:
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=pg_timeout),
    )
    while True:
        item = inq.get()
        if item is None:
            break
        fn, args, kwargs = _loads(item)
        try:
            res = ("ok", fn(*args, **kwargs))
        except BaseException as e:  # report everything, keep serving
            res = ("err", (type(e).__name__, str(e), traceback.format_exc()))
        outq.put((rank, _dumps(res)))
    dist.destroy_process_group()


class RankError(Exception):
    def __init__(self, errors: dict[int, tuple[str, str, str]]):
        self.errors = errors
        lines = [f"rank {r}: {t}: {m}" for r, (t, m, _) in sorted(errors.items())]
        first = next(iter(sorted(errors.items())))[1][2]
        super().__init__("\n".join(lines) + "\n--- first traceback ---\n" + first)


class Pool:
    def __init__(self, world: int, pg_timeout: float = 60.0):
        self.world, self.pg_timeout = world, pg_timeout
        self.procs: list = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self.inq = [ctx.Queue() for _ in range(self.world)]
        self.outq = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(r, self.world, port, self.pg_timeout, self.inq[r], self.outq),
                daemon=True,
            )
            for r in range(self.world)
        ]
        for p in self.procs:
            p.start()

    def close(self) -> None:
        for q, p in zip(self.inq, self.procs):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self.procs = []

    def restart(self) -> None:
        for p in self.procs:
            p.kill()
        self.procs = []
        self._start()

    def run(self, fn, *args, timeout: float = 180.0, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results.

        Raises RankError if any rank raised: the pool is kept when EVERY rank raised (a
        clean, collective rejection such as input validation), rebuilt otherwise.
        """
        payload = _dumps((fn, args, kwargs))
        for q in self.inq:
            q.put(payload)
        results: dict[int, tuple] = {}
        try:
            while len(results) < self.world:
                rank, res = self.outq.get(timeout=timeout)
                results[rank] = _loads(res)
        except queue.Empty:
            missing = sorted(set(range(self.world)) - set(results))
            self.restart()
            raise TimeoutError(f"ranks {missing} did not answer within {timeout}s") from None
        errors = {r: v for r, (k, v) in results.items() if k == "err"}
        if errors:
            if len(errors) < self.world:
                self.restart()
            raise RankError(errors)
        return [results[r][1] for r in range(self.world)]


class Pools:
    """One Pool per world size, created on first use, closed at the end of the session."""

    def __init__(self):
        self._pools: dict[int, Pool] = {}

    def __call__(self, world: int) -> Pool:
        if world not in self._pools:
            self._pools[world] = Pool(world)
        return self._pools[world]

    def close(self) -> None:
        for p in self._pools.values():
            p.close()
