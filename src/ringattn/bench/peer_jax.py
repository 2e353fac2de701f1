"""JAX's official ``ringattention`` (0.1.2: ``ringattention_jax.ring_attention``, the
blockwise ring of the paper's authors) as a peer of ``ringattn bench peers``.

JAX cannot join our gloo ranks, so it runs in a child process of its own
(``python -m ringattn.bench.peer_jax``): W XLA CPU devices under ``shard_map``, K/V passed
round the ring by ``lax.ppermute``, each device's ops on one thread (multi-threaded Eigen off).
Its layout is contiguous (no load balance); masked chunks are skipped by its own
``below_or_on_diag`` test. The inputs are the same seeded ones (:func:`harness.make_inputs`),
and out, dq, dk, dv come back in global order for the parent to check against the oracle.

Its package ``__init__`` calls ``jax.lib.xla_bridge``, gone from current JAX, so the module
is loaded by path; flax, which it imports for ``blockwise_feedforward`` only, is a stand-in
while it loads (not needed, not installed by us).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from . import peer_adapters

CHUNK = 512  # its query and key chunk at most (LWM's scan chunk size)


def installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("jax", "ringattention"))


def run(row: dict, repeats: int, out_file: Path, chunk: int = CHUNK, timeout=3600.0) -> dict:
    """Time its fwd+bwd of ``row``'s causal problem on ``row['world']`` XLA CPU devices in a
    child process (median wall and least CPU seconds of ``repeats`` after a compiling
    warm-up); out, dq, dk, dv (b, s, h, d) in the input dtype are saved to ``out_file``."""
    flags = (
        f"--xla_force_host_platform_device_count={row['world']} --xla_cpu_multi_thread_eigen=false"
    )
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    spec = json.dumps(dict(row=row, repeats=repeats, out=str(out_file), chunk=chunk))
    cmd = [sys.executable, "-m", "ringattn.bench.peer_jax", spec]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"jax-ringattention failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _module():
    """``ringattention.ringattention_jax``, without the package ``__init__`` and with a
    stand-in ``flax`` in ``sys.modules`` only while it loads."""
    flax = {n: types.ModuleType(n) for n in ("flax", "flax.linen", "flax.linen.partitioning")}
    flax["flax"].linen = flax["flax.linen"]
    flax["flax.linen"].partitioning = flax["flax.linen.partitioning"]
    root = importlib.util.find_spec("ringattention").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location(
        "_ringattention_jax", Path(root, "ringattention_jax.py")
    )
    mod = importlib.util.module_from_spec(spec)
    with peer_adapters.modules_set(flax):
        spec.loader.exec_module(mod)
    return mod


def _child(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from .harness import GRADS, make_inputs

    row, ring = spec["row"], _module()
    w, dtype = row["world"], {"fp32": jnp.float32, "bf16": jnp.bfloat16}[row["dtype"]]
    # its scans reshape a block into whole chunks: the largest divisor of the block <= chunk
    local = row["seq"] // w
    chunk = next(c for c in range(min(spec["chunk"], local), 0, -1) if local % c == 0)
    opts = dict(causal_block_size=1, query_chunk_size=chunk, key_chunk_size=chunk,
                deterministic=True, dropout_rng=None, attn_pdrop=0.0, dtype=dtype,
                policy=jax.checkpoint_policies.nothing_saveable, precision=None,
                prevent_cse=True)  # fmt: skip
    mesh = Mesh(np.array(jax.devices()[:w]), ("sp",))
    seq = P(None, "sp", None, None)  # (b, s, h, d), the sequence over the ring
    attn = jax.shard_map(
        lambda q, k, v: ring.ring_attention(q, k, v, None, None, None, "sp", True, opts),
        mesh=mesh, in_specs=(seq, seq, seq), out_specs=seq, check_vma=False,
    )  # fmt: skip

    @jax.jit
    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(attn, q, k, v)
        return (out, *vjp(do))

    place = NamedSharding(mesh, seq)
    args = [jax.device_put(jnp.asarray(t.float().numpy(), dtype), place) for t in make_inputs(row)]
    got = jax.block_until_ready(fwd_bwd(*args))  # compiles
    walls, cpus = [], []
    for _ in range(max(spec["repeats"], 1)):
        t0, c0 = time.perf_counter(), time.process_time()
        got = jax.block_until_ready(fwd_bwd(*args))
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[row["dtype"]]
    to_torch = lambda x: torch.from_numpy(np.asarray(x, np.float32)).to(tdt)  # bf16: exact
    torch.save({n: to_torch(x) for n, x in zip(GRADS, got)}, spec["out"])
    return dict(wall_s=float(np.median(walls)), cpu_s=min(cpus), version=jax.__version__)


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
