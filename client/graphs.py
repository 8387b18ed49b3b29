"""Dynamo's graph as Hypatia plans it, and the rewritten graph every executor takes.

The *model graph* is Dynamo's graph traced to functional ATen operators (``make_fx`` over
``functionalize``) before AOTAutograd splits it into forward and backward: the whole forward
computation, so a rule sees the same region in training and in inference, and a fused region's
backward comes from its operator's autograd formula. The *rewritten graph* is the model graph
with every planned region replaced by what its kernel places (``hypatia::`` custom ops or ATen's
fused operators), traced once more so that it holds operators only, with Dynamo's input
metadata carried over: Inductor, CUDA graphs and export take it like any other graph.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

from hypatia.client.torch_internals import carry_dynamo_metadata, python_dispatcher
from hypatia.kernels.pointwise_layout import same_layout, with_layout
from hypatia.planner.counters import counters
from hypatia.planner.executable import apply_plan
from hypatia.planner.plan import Plan


class NotRewritable(Exception):
    """Dynamo's graph cannot be traced to a model graph here; it runs unrewritten."""


# Calls inside a Dynamo graph that change autograd's state: a model graph traced from such a
# graph would lose them, so a training graph holding one is not rewritten.
_GRAD_STATE = {torch._C._set_grad_enabled, torch.autograd.grad_mode.set_grad_enabled}


@dataclass
class ModelGraph:
    gm: torch.fx.GraphModule
    fake_inputs: list
    fake_mode: Any
    training: bool


def is_training(example_inputs: list) -> bool:
    """Whether the graph will be differentiated: grad mode on and an input requiring grad."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def _fake_inputs(example_inputs: list) -> tuple[list, Any]:
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    for x in example_inputs:
        if not isinstance(x, torch.Tensor):
            raise NotRewritable(f"an input of type {type(x).__name__} (dynamic shapes or a scalar input)")
    fake_mode = detect_fake_mode(example_inputs) or FakeTensorMode()
    fakes = []
    for x in example_inputs:
        if isinstance(x, torch._subclasses.FakeTensor):
            fakes.append(x)
        else:
            fakes.append(fake_mode.from_tensor(x, static_shapes=True))
    return fakes, fake_mode


def _operators(fn: Callable, fake_inputs: list, fake_mode: Any) -> torch.fx.GraphModule:
    """``fn`` traced to functional operators on ``fake_inputs``, dead nodes removed."""
    with fake_mode, python_dispatcher():
        gm = make_fx(torch.func.functionalize(fn, remove="mutations"))(*fake_inputs)
    # tracing under autograd leaves a detach for every tensor autograd saves; nothing reads them
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def trace(gm: torch.fx.GraphModule, example_inputs: list) -> ModelGraph:
    """The model graph of Dynamo's ``gm``; raises :class:`NotRewritable` saying why not."""
    training = is_training(example_inputs)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor) and any(not isinstance(s, int) for s in value.shape):
                raise NotRewritable("the graph has dynamic shapes")
    if training:
        _check_grad_switches(gm)
    fakes, fake_mode = _fake_inputs(example_inputs)
    try:
        traced = _operators(gm, fakes, fake_mode)
    except Exception as exc:  # noqa: BLE001 - whatever make_fx refuses runs unrewritten
        raise NotRewritable(f"tracing to ATen operators failed: {type(exc).__name__}: {exc}"[:400]) from exc
    return ModelGraph(traced, fakes, fake_mode, training)


def _check_grad_switches(gm: torch.fx.GraphModule) -> None:
    """A training graph may switch grad mode off inside itself (``torch.no_grad()`` in a model's
    forward, as the rotary embeddings of Llama and its kind do) only where nothing computed with
    grad off depends on a tensor that requires grad: the ATen trace drops the switch, which is
    then exact, since those values would not require grad either way. Anything else is
    :class:`NotRewritable`."""
    enabled, requires = True, set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor) and value.requires_grad:
                requires.add(node)
        elif node.op == "get_attr":
            value = gm
            for name in str(node.target).split("."):
                value = getattr(value, name, None)
            if isinstance(value, torch.Tensor) and value.requires_grad:
                requires.add(node)
        elif node.op == "call_function" and node.target in _GRAD_STATE:
            if not node.args or not isinstance(node.args[0], bool):
                raise NotRewritable("the training graph switches grad mode inside itself, to a value not known "
                                    "when it is traced")
            enabled = node.args[0]
        elif node.op != "output":
            needs = any(a in requires for a in node.all_input_nodes)
            if needs and not enabled:
                raise NotRewritable("the training graph switches grad mode off inside itself around a tensor "
                                    "that requires grad")
            if needs:
                requires.add(node)
    if not enabled:
        raise NotRewritable("the training graph leaves grad mode off at its end")


def rewrite(model: ModelGraph, fx_nodes: list[torch.fx.Node], plan: Plan, dynamo_gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new graph of operators computing what the model graph computes, with every region of
    ``plan`` replaced by its kernel's operators, carrying Dynamo's input metadata."""
    planned = apply_plan(model.gm, fx_nodes, plan)
    for node in [n for n in planned.graph.nodes if "hypatia_kernel" in n.meta]:
        _inline(planned, node, model.fake_mode, model.training)
    planned.graph.lint()
    planned.recompile()
    return carry_dynamo_metadata(planned, dynamo_gm)


def _inline(gm: torch.fx.GraphModule, node: torch.fx.Node, fake_mode: Any, training: bool) -> None:
    """Replace ``node``, a call of a kernel-library function, by the operators the function
    runs: only the region is traced, on its inputs' fake values, not the whole graph again."""
    inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
    expected = node.meta.get("val")

    def call(*tensors: torch.Tensor) -> Any:
        it = iter(tensors)
        out = node.target(*[next(it) if isinstance(a, torch.fx.Node) else a for a in node.args])
        # The graph's later views were traced against the unfused ops' layout: a kernel that
        # returns another one is followed by a copy into that layout.
        if isinstance(out, torch.Tensor) and isinstance(expected, torch.Tensor) and not same_layout(out, expected):
            copied = with_layout(out, expected)
            if copied is not None:
                counters["rewrite.layout_copies"] += 1
                return copied
        return out

    # In training the region is traced as autograd will run it: ATen's composite operators pick
    # their variant by it (SDPA keeps the log-sum-exp its backward needs only then).
    with fake_mode:
        fakes = [a.meta["val"].detach().requires_grad_(training and a.meta["val"].is_floating_point()) for a in inputs]
    region = _operators(call, fakes, fake_mode)
    values: dict[torch.fx.Node, Any] = dict(zip((n for n in region.graph.nodes if n.op == "placeholder"), inputs))
    for const in (n for n in region.graph.nodes if n.op == "get_attr"):  # tensors the kernel baked in
        name = next(f"_hypatia_constant{i}" for i in itertools.count() if not hasattr(gm, f"_hypatia_constant{i}"))
        setattr(gm, name, getattr(region, const.target))
        with gm.graph.inserting_before(node):
            values[const] = gm.graph.get_attr(name)
    with gm.graph.inserting_before(node):
        out = gm.graph.graph_copy(region.graph, values)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def copy_of(gm: torch.fx.GraphModule, dynamo_gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` (with Dynamo's input metadata) that a compiler may consume."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return carry_dynamo_metadata(torch.fx.GraphModule(gm, graph), dynamo_gm)


def operators_in(gm: torch.fx.GraphModule, namespace: str = "hypatia") -> list[str]:
    """The names of the ``namespace`` operators a graph calls, in graph order."""
    return [str(n.target) for n in gm.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == namespace]
