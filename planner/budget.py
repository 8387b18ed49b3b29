"""The tuner's memory budget: what measuring a region would allocate, checked before it does.

A workload names its shapes, so a 2 KB request can describe a 16384 x 16384 weight; the tuner
estimates the bytes a region needs from the graph's tensor metadata alone and skips a region
over the budget instead of allocating it.
"""

from __future__ import annotations

import os

from hypatia.canonical import CanonicalGraph
from hypatia.planner.plan import Region
from hypatia.planner.rules import tensor_meta

# The default budget without HYPATIA_TUNE_MEMORY_MB: this share of the machine's memory for CPU
# regions, of the device's memory for GPU regions.
HOST_SHARE, DEVICE_SHARE = 0.25, 0.5
ITEMSIZE = {"float64": 8, "int64": 8, "complex64": 8, "float32": 4, "int32": 4, "float16": 2, "bfloat16": 2,
            "int16": 2, "int8": 1, "uint8": 1, "bool": 1}
FLOAT64 = 8


class OverBudget(Exception):
    """Every region left to measure needs more memory than the tuning budget allows."""


def _numel_and_size(meta: object) -> tuple[int, int]:
    """(elements, bytes per element) of one tensor described by ``meta``; (0, 0) for a
    non-tensor or a symbolic shape."""
    m = tensor_meta(meta)
    if m is None or not all(isinstance(s, int) for s in m[0]):
        return 0, 0
    numel = 1
    for size in m[0]:
        numel *= max(size, 0)
    return numel, ITEMSIZE.get(str(m[1]), FLOAT64)


def region_bytes(graph: CanonicalGraph, region: Region) -> int:
    """An upper estimate of what measuring ``region`` allocates: its inputs drawn twice (and
    copied once to keep their layout), every node's result for the eager run and for an
    implementation, and a float64 copy of inputs and results for the accuracy reference."""
    inputs = [_numel_and_size(graph.nodes[j].meta) for j in region.inputs]
    results = [_numel_and_size(graph.nodes[i].meta) for i in region.nodes]
    in_bytes = sum(n * size for n, size in inputs)
    out_bytes = sum(n * size for n, size in results)
    wide = sum(n for n, _ in (*inputs, *results)) * FLOAT64
    return 3 * in_bytes + 2 * out_bytes + wide


def default_budget(device_type: str) -> int:
    """Bytes a tuning may use without HYPATIA_TUNE_MEMORY_MB: a share of the host's memory, or
    of the current GPU's."""
    if device_type == "cuda":
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory * DEVICE_SHARE)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * HOST_SHARE)


def budget_bytes(configured_mb: int, device_type: str) -> int:
    """The budget in bytes: ``HYPATIA_TUNE_MEMORY_MB`` when set (non-zero), else the default."""
    return configured_mb * 2**20 if configured_mb > 0 else default_budget(device_type)
