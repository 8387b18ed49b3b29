"""The debug toolkit: artifacts of every compile, KernelDiff (:func:`compare`), the minifier, reports."""

from hypatia.debug.kernel_diff import DiffReport, RegionAttribution, compare
from hypatia.debug.metrics import TensorDiff, tensor_diff

__all__ = ["DiffReport", "RegionAttribution", "TensorDiff", "compare", "tensor_diff"]
