"""ringattn: exact ring attention and the context-parallel family for PyTorch."""

__version__ = "0.1.0"

from .blockwise import blockwise_attention
from .comm import CommError, count_comm
from .cp import STRATEGIES, context_parallel_attention
from .kernels import KERNELS, Kernel, MaskSpec
from .layouts import LAYOUTS, permutation, positions, shard, unshard
from .ring import ring_attention
from .schedule import attention_flops

__all__ = [
    "KERNELS",
    "LAYOUTS",
    "CommError",
    "Kernel",
    "MaskSpec",
    "STRATEGIES",
    "attention_flops",
    "blockwise_attention",
    "context_parallel_attention",
    "count_comm",
    "permutation",
    "positions",
    "ring_attention",
    "shard",
    "unshard",
]
