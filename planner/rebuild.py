"""Canonical graph -> runnable FX graph, for the hypatia device: the daemon rebuilds a whole
graph it stored and runs it on a client's tensors.

Only what the canonical form says exactly can be rebuilt: ATen operators that do not mutate
their arguments, constants that decode to plain values (dtypes, devices, layouts, slices),
static shapes. A constant tensor baked into the graph is kept only as a content hash, a symbolic
size only as its expression, so such graphs are refused with :class:`NotRebuildable` (clients
send constants as inputs). Nothing from the wire is evaluated: op names
are looked up in ``torch.ops.aten`` by name, after a character check.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Callable

import torch
import torch.fx

from hypatia.canonical import CanonicalGraph, is_ref

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class NotRebuildable(Exception):
    """The canonical graph holds something that cannot be run from its canonical form alone
    (a constant tensor, a symbolic size, a mutating or random op, a non-CPU device)."""


def resolve_op(op: str, random: bool = False) -> Callable:
    """The callable for a canonical op name: an ATen overload, or ``operator.getitem``; one that
    draws random numbers only with ``random`` (the hypatia device, whose generator is the daemon's)."""
    if op == "_operator.getitem":
        return operator.getitem
    parts = op.split(".")
    if len(parts) != 3 or parts[0] != "aten" or not all(_NAME.fullmatch(p) and not p.startswith("__") for p in parts[1:]):
        raise NotRebuildable(f"op {op[:80]!r} is not an ATen operator overload")
    try:
        fn = getattr(getattr(torch.ops.aten, parts[1]), parts[2])
    except (AttributeError, RuntimeError):
        raise NotRebuildable(f"op {op} is not an operator this torch has") from None
    check_op(fn, random)
    return fn


def check_op(fn: Any, random: bool = False) -> None:
    """:class:`NotRebuildable` unless ``fn`` is an ATen operator overload the daemon runs: one
    that writes to none of its arguments and, without ``random``, draws no random numbers."""
    if not isinstance(fn, torch._ops.OpOverload) or fn.namespace != "aten":
        raise NotRebuildable(f"op {getattr(fn, '__name__', fn)} is not an ATen operator overload")
    if fn._schema.is_mutable:
        raise NotRebuildable(f"op {fn} writes to one of its arguments")
    if torch.Tag.nondeterministic_seeded in fn.tags and not random:
        raise NotRebuildable(f"op {fn} draws random numbers (the daemon's generator is not this process's)")


def _enum(name: Any) -> Any:
    value = getattr(torch, str(name).rsplit(".", 1)[-1], None) if _NAME.fullmatch(str(name).rsplit(".", 1)[-1]) else None
    if not isinstance(value, (torch.layout, torch.memory_format)):
        raise NotRebuildable(f"enum {str(name)[:60]!r} is not a torch layout or memory format")
    return value


def decode(arg: Any, nodes: list[torch.fx.Node], device: torch.device | None = None) -> Any:
    """An encoded argument as the FX argument it was: references become ``nodes[i]``; devices
    are the CPU, or ``device`` (of its type) for the hypatia device's graphs."""
    if is_ref(arg):
        return nodes[arg[1]]
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    tag = arg[0] if isinstance(arg, list) and arg else None
    if tag == "l" and len(arg) == 2 and isinstance(arg[1], list):
        return [decode(a, nodes, device) for a in arg[1]]
    if tag == "slice" and len(arg) == 2 and isinstance(arg[1], list) and len(arg[1]) == 3:
        return slice(*(decode(a, nodes, device) for a in arg[1]))
    if tag == "dtype" and len(arg) == 2:
        value = getattr(torch, arg[1], None) if isinstance(arg[1], str) and _NAME.fullmatch(arg[1]) else None
        if not isinstance(value, torch.dtype):
            raise NotRebuildable(f"dtype {str(arg[1])[:40]!r} is not a torch dtype")
        return value
    if tag == "device" and len(arg) == 2:
        if device is not None and arg[1] in ("cpu", device.type):
            return device if arg[1] == device.type else torch.device("cpu")
        if arg[1] != "cpu":
            raise NotRebuildable(f"device {str(arg[1])[:20]!r}: remote mode runs CPU graphs only")
        return torch.device("cpu")
    if tag == "enum" and len(arg) == 2:
        return _enum(arg[1])
    if tag == "ellipsis":
        return Ellipsis
    if tag == "tensor":
        raise NotRebuildable("a constant tensor is baked into the graph (only its hash is kept)")
    if tag == "sym":
        raise NotRebuildable("the graph has symbolic sizes (dynamic shapes)")
    raise NotRebuildable(f"argument {str(arg)[:60]} cannot be rebuilt from the canonical graph")


def _check_meta(i: int, meta: Any, device_type: str = "cpu") -> None:
    if isinstance(meta, list) and meta and meta[0] == "tuple":
        for m in meta[1]:
            _check_meta(i, m, device_type)
    elif isinstance(meta, list) and len(meta) == 5 and meta[0] == "T":
        if meta[4] not in ("cpu", device_type):
            raise NotRebuildable(f"node {i} lives on {meta[4]}, not on the daemon's {device_type}")
        if not all(isinstance(s, int) for s in meta[1]):
            raise NotRebuildable(f"node {i} has a symbolic shape (dynamic shapes)")
    elif isinstance(meta, list) and meta and meta[0] == "sym":
        raise NotRebuildable(f"node {i} is a symbolic value (dynamic shapes)")


def input_specs(graph: CanonicalGraph) -> list[tuple[list[int], str]]:
    """(shape, dtype name) of each graph input, in input order; a run's tensors must match."""
    return [(graph.nodes[i].meta[1], graph.nodes[i].meta[3]) for i in graph.placeholders()]


def graph_module(graph: CanonicalGraph, device: torch.device | None = None) -> tuple[torch.fx.GraphModule, list[torch.fx.Node]]:
    """A GraphModule computing ``graph`` (inputs in placeholder order) and, per canonical index,
    its FX node: what :func:`hypatia.planner.executable.apply_plan` takes. With ``device`` (the
    hypatia device's graphs) tensors may live there too and random ops are allowed."""
    fx = torch.fx.Graph()
    nodes: list[torch.fx.Node] = []
    placeholders = 0
    for i, node in enumerate(graph.nodes):
        _check_meta(i, node.meta, device.type if device is not None else "cpu")
        if node.op == "placeholder":
            if not (isinstance(node.meta, list) and len(node.meta) == 5 and node.meta[0] == "T"):
                raise NotRebuildable(f"input {placeholders} is not a tensor")
            if node.args != [placeholders]:
                raise NotRebuildable(f"placeholder {i} is out of input order")
            nodes.append(fx.placeholder(f"in{placeholders}"))
            placeholders += 1
        elif node.op == "get_attr":
            raise NotRebuildable(f"node {i} reads a constant tensor of the model (only its hash is kept)")
        else:
            fn = resolve_op(node.op, random=device is not None)
            args = tuple(decode(a, nodes, device) for a in node.args)
            kwargs = {k: decode(v, nodes, device) for k, v in node.kwargs.items()}
            nodes.append(fx.call_function(fn, args, kwargs))
    out = decode(graph.outputs, nodes)
    fx.output(tuple(out) if isinstance(out, list) else out)
    fx.lint()
    return torch.fx.GraphModule(torch.nn.Module(), fx), nodes

