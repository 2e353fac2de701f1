"""Analytic planner and ring simulator: what fits, how long it takes, where the ring stalls.

``hardware`` describes devices and links, ``cost`` the paper's block-size rule, per-device
memory and predicted step time, ``simulate`` a discrete-event model of one ring attention
layer, ``cli`` the ``ringattn plan`` and ``ringattn simulate`` commands.
"""

from ringattn.plan.cost import (
    MemoryBreakdown,
    StepEstimate,
    max_context,
    memory_breakdown,
    min_block_size,
    min_block_size_precise,
    min_seq_per_device,
    paper_table,
    predict_step,
    vanilla_activation_bytes,
)
from ringattn.plan.hardware import HARDWARE, Hardware, calibrate_from, get_hardware, measure_cpu
from ringattn.plan.simulate import SimResult, simulate, to_png, work_fractions

__all__ = [
    "HARDWARE",
    "Hardware",
    "MemoryBreakdown",
    "SimResult",
    "StepEstimate",
    "calibrate_from",
    "get_hardware",
    "max_context",
    "measure_cpu",
    "memory_breakdown",
    "min_block_size",
    "min_block_size_precise",
    "min_seq_per_device",
    "paper_table",
    "predict_step",
    "simulate",
    "to_png",
    "vanilla_activation_bytes",
    "work_fractions",
]
