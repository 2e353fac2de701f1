"""Layout-independent initialisation: any slice of a parameter, drawn as the full one would be.

A parameter of global shape ``(rows, *rest)`` is cut into fixed chunks of whole rows
(about :data:`CHUNK_ELEMS` elements each). Chunk ``c`` is drawn from its own generator,
seeded from ``(seed, parameter name, c)``; a rank that holds only a box of the parameter
(an FSDP row shard, a tensor-parallel column shard, or both) draws just the chunks its rows
touch and copies out its box. So the global weights are the same at any dp / tp / cp, and
no rank ever holds more than one chunk beyond its own shard.

Why chunks of rows and not one generator per parameter: one stream would have to be drawn
from its start up to the shard (the whole parameter for the last rank); why not a
counter-based hash per element: torch has no such primitive, and an element-wise hash in
Python ops would cost more than ``randn``. Values depend on the device type (CPU and CUDA
generators differ), never on the layout.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

__all__ = ["CHUNK_ELEMS", "chunk_seed", "normal_box_"]

CHUNK_ELEMS = 1 << 22  # 4M elements: 16 MB of fp32 scratch per chunk at most


def chunk_seed(seed: int, name: str, chunk: int) -> int:
    """A 63-bit seed for chunk ``chunk`` of parameter ``name``: stable across processes
    (``hash()`` of a str is randomised per process)."""
    digest = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@torch.no_grad()
def normal_box_(
    out: torch.Tensor,
    global_shape: Sequence[int],
    offset: Sequence[int],
    *,
    seed: int,
    name: str,
    std: float,
) -> torch.Tensor:
    """Fill ``out`` with its box of the N(0, std) tensor of ``global_shape`` named ``name``.

    ``out`` has the box's shape and starts at ``offset`` (one index per dim) in the global
    tensor; for an unsharded parameter, ``global_shape = out.shape`` and ``offset = 0``.
    """
    rows = global_shape[0] if global_shape else 1
    rest = tuple(global_shape[1:])
    rows_per_chunk = max(1, CHUNK_ELEMS // max(1, math.prod(rest)))
    r0 = offset[0] if offset else 0
    r1 = r0 + (out.shape[0] if out.dim() else 1)
    inner = tuple(slice(o, o + n) for o, n in zip(offset[1:], out.shape[1:], strict=True))
    flat_out = out.view(-1, *out.shape[1:]) if out.dim() else out.view(1)
    gen = torch.Generator(device=out.device)
    for c in range(r0 // rows_per_chunk, -(-r1 // rows_per_chunk)):
        cs, ce = c * rows_per_chunk, min(rows, (c + 1) * rows_per_chunk)
        gen.manual_seed(chunk_seed(seed, name, c))
        block = torch.randn((ce - cs, *rest), generator=gen, device=out.device)  # fp32
        lo, hi = max(cs, r0), min(ce, r1)
        flat_out[lo - r0 : hi - r0].copy_(block[(slice(lo - cs, hi - cs), *inner)].mul_(std))
    return out
