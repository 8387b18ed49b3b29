"""Hypatia's debugging tools: KernelDiff (:func:`compare`) and what it reports."""

from hypatia.debug.kernel_diff import DiffReport, RegionAttribution, compare
from hypatia.debug.metrics import TensorDiff, tensor_diff

__all__ = ["DiffReport", "RegionAttribution", "TensorDiff", "compare", "tensor_diff"]
