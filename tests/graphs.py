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


def assert_training_step_matches(compiled, model: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor) -> None:
    """One forward and backward of ``compiled`` (built on ``model``) and of ``reference``: the
    outputs and every parameter's gradient must match."""
    out, expected = compiled(x), reference(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
