"""The debug toolkit: artifacts of every compile, KernelDiff (:func:`compare`), the minifier
(:func:`minify`, :func:`minify_model`), reports.

Its names are imported when first used: the backend imports this package's small ``trail``
module on every compile, and the toolkit's other modules cost only a process that uses them."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "process_folder": "folder", "DiffReport": "kernel_diff", "RegionAttribution": "kernel_diff",
    "compare": "kernel_diff", "TensorDiff": "metrics", "tensor_diff": "metrics", "DoesNotFail": "delta",
    "Minified": "delta", "minify": "delta", "write_repro": "repro", "minify_model": "triggers",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'hypatia.debug' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hypatia.debug.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
