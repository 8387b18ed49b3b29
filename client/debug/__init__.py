"""The debug toolkit: artifacts of every compile, KernelDiff (:func:`compare`), the minifier
(:func:`minify`, :func:`minify_model`), reports."""

from hypatia.debug.folder import process_folder
from hypatia.debug.kernel_diff import DiffReport, RegionAttribution, compare
from hypatia.debug.metrics import TensorDiff, tensor_diff
from hypatia.debug.minify import DoesNotFail, Minified, minify
from hypatia.debug.repro import write_repro
from hypatia.debug.triggers import minify_model

__all__ = ["DiffReport", "DoesNotFail", "Minified", "RegionAttribution", "TensorDiff", "compare", "minify",
           "minify_model", "process_folder", "tensor_diff", "write_repro"]
