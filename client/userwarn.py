"""Warnings that point at the user's line: the call of the compiled model or of torch.compile,
not the Dynamo or Hypatia frame that noticed the problem."""

from __future__ import annotations

import sys
import sysconfig
import warnings
from pathlib import Path

import torch

_STDLIB = sysconfig.get_paths()["stdlib"]
_TORCH = str(Path(torch.__file__).parent)
# Code that torch generates (FX graph modules) or the import machinery runs: never the user's.
_GENERATED = ("<eval_with_key>", "<frozen ")


def _hypatia_dirs() -> tuple[str, ...]:
    """The folders Hypatia's imported modules live in (one per package in a source checkout)."""
    dirs = {str(Path(m.__file__).parent) for name, m in list(sys.modules.items())
            if (name == "hypatia" or name.startswith("hypatia.")) and getattr(m, "__file__", None)}
    return tuple(sorted(dirs))


def _internal(filename: str, hypatia: tuple[str, ...]) -> bool:
    if filename.startswith(_GENERATED):
        return True
    if filename.startswith(_STDLIB) and "-packages" not in filename:
        return True
    return any(filename == d or filename.startswith(d + "/") for d in (_TORCH, *hypatia))


def _skipped_by_warnings(filename: str) -> bool:
    """Frames ``warnings.warn`` passes over without counting them in ``stacklevel``."""
    return "importlib" in filename and "_bootstrap" in filename


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside torch, Hypatia
    and the standard library: the user's line (the caller's caller where there is none)."""
    hypatia = _hypatia_dirs()
    frame, level = sys._getframe(0), 1  # stacklevel 1 is this frame
    while frame is not None and _internal(frame.f_code.co_filename, hypatia):
        frame = frame.f_back
        if frame is not None and not _skipped_by_warnings(frame.f_code.co_filename):
            level += 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 3)
