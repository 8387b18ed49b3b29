"""Helpers that turn small functions into ATen FX graphs the way AOTAutograd hands them over."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from hypatia.client.capture import capture


def aten_graph(fn, *inputs) -> torch.fx.GraphModule:
    """An ATen-level FX graph of ``fn`` with FakeTensor meta on every node."""
    return make_fx(fn, tracing_mode="fake")(*inputs)


def key_of(fn, *inputs) -> str:
    return capture(aten_graph(fn, *inputs))[0].key


def canonical(fn, *inputs):
    return capture(aten_graph(fn, *inputs))[0]
