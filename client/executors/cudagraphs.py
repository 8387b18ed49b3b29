"""The ``cudagraphs`` executor: a graph recorded once and replayed as CUDA graphs, which removes
the host's cost of launching its kernels one by one. For training both the forward and the
backward graph are captured, and parameters stay where they are between replays, so an
optimizer step between calls is seen by the next replay. Inductor's code is captured through its
own ``reduce-overhead`` mode; eager and aten graphs through the same cudagraph trees.

A graph that cannot be captured safely is not captured, and :func:`refusal` says why: not on a
CUDA device, dynamic shapes, CPU tensors inside, or inputs it writes to. Off a CUDA device nothing
is captured; the other reasons stop the eager and aten captures only, since Inductor's
``reduce-overhead`` mode checks its own code and handles them (it records a graph per shape,
replays writes into buffers that stay in place, and runs what it cannot capture without CUDA
graphs, counting it in torch's own ``cudagraph_skips``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx

from hypatia.client.torch_internals import cudagraph_trees

REASONS = ("not_cuda", "dynamic_shapes", "cpu_tensors", "input_mutation")


def refusal(dynamo_gm: torch.fx.GraphModule, model_gm: torch.fx.GraphModule | None, example_inputs: list) -> str | None:
    """Why this graph must not be captured (one of :data:`REASONS`), or None."""
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if not torch.cuda.is_available() or not tensors or any(t.device.type != "cuda" for t in tensors):
        return "not_cuda"
    if any(not isinstance(x, torch.Tensor) for x in example_inputs):
        return "dynamic_shapes"
    for node in dynamo_gm.graph.nodes:
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor):
            if any(not isinstance(s, int) for s in value.shape):
                return "dynamic_shapes"
            if value.device.type == "cpu" and value.dim() > 0:
                return "cpu_tensors"
    if model_gm is not None and _mutates_inputs(model_gm):
        return "input_mutation"
    return None


def allows(refused: str | None, executor: str) -> bool:
    """Whether ``executor`` may run captured, given the graph's :func:`refusal`."""
    return refused is None or (executor == "inductor" and refused != "not_cuda")


def _mutates_inputs(gm: torch.fx.GraphModule) -> bool:
    """A functionalized graph writes its inputs back with ``copy_`` (batch norm's running
    statistics in training, an in-place update of an argument)."""
    inputs = {n for n in gm.graph.nodes if n.op == "placeholder"}
    return any(n.op == "call_function" and n.target is torch.ops.aten.copy_.default and n.args[0] in inputs
               for n in gm.graph.nodes)


def capture(gm: torch.fx.GraphModule, inputs: list, on_skip: Callable[[str], None]) -> Callable[..., Any]:
    """``gm`` under cudagraph trees (forward and backward); ``on_skip`` hears torch's reasons
    when its own checks refuse a graph."""
    return cudagraph_trees(gm, inputs, on_skip)
