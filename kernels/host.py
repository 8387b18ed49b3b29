"""The host placement: a CPU kernel run on copies of a GPU region's inputs, its result copied
back. It is one of the planner's alternatives for a region on a GPU; the tuner keeps it only
where it measures faster than the device's own choices (in practice: almost never, which is
exactly what the measurement is for)."""

from __future__ import annotations

from typing import Any, Callable

import torch


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


def on_host(kernel: Callable) -> Callable:
    """``kernel`` wrapped to run on the CPU: tensor arguments are copied to the host and the
    result is copied back to the device of the first tensor argument."""

    def call(*args: Any) -> Any:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        return _to(kernel(*_to(args, torch.device("cpu"))), device)

    call.__name__ = f"on_host_{getattr(kernel, '__name__', 'kernel')}"
    call.__qualname__ = call.__name__
    return call
