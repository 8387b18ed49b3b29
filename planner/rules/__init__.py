"""Rewrite rules as data: every fusion family is a module holding a table of named rules.

A rule's *pattern* is written as nested tuples over ATen op names and is matched by egglog on
the e-graph of a canonical graph (see :mod:`hypatia.planner.egraph`):

- ``("aten.relu.default", X)``: an op node with exactly these children;
- ``"$name"``: any graph node, which becomes an input of the fused region;
- ``"_"``: anything (a constant, or a node whose identity does not matter);
- ``Lit(value)``: exactly this constant (as captured: ``-1``, ``False``, ``"tanh"``);
- ``Kw(name, value)``: the keyword argument ``name=value`` (kwargs follow positional args,
  sorted by name).

Patterns that are not trees (a value used twice: softmax, layer norm) are
:class:`GraphPattern` values, found by networkx subgraph isomorphism and fed to the e-graph.
*Rewrites* add helper e-nodes (``hypatia.*``) that later patterns build on, e.g. a batched
matmul however AOTAutograd spelled it. A rule's ``build`` turns a match into the kernel call
(signature, inputs, constants) or rejects it; a rejected match is a counted near miss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from hypatia.canonical import CanonicalGraph, is_ref


@dataclass(frozen=True)
class Lit:
    """An exact constant in a pattern."""

    value: Any


@dataclass(frozen=True)
class Kw:
    """An exact keyword argument in a pattern."""

    name: str
    value: Any


Pattern = Any  # tuple | str | Lit | Kw


@dataclass(frozen=True)
class GraphPattern:
    """A non-tree pattern: ``nodes`` maps a name to ``(op, children)``; a child is another
    node's name or ``"$input"`` (any graph node, which becomes a region input) or ``"_"``
    (a constant checked by the rule's ``build``). ``root`` names the node whose value the
    region produces."""

    nodes: Mapping[str, tuple[str, tuple[str, ...]]]
    root: str


@dataclass(frozen=True)
class Match:
    """One place where a rule's pattern holds: the root node, the named inputs and every
    canonical node between them (the region the kernel call replaces)."""

    graph: CanonicalGraph
    root: int
    inputs: Mapping[str, int]
    nodes: frozenset[int]

    def node(self, i: int):
        return self.graph.nodes[i]

    def members(self, op: str) -> list[int]:
        return sorted(i for i in self.nodes if self.graph.nodes[i].op == op)


@dataclass(frozen=True)
class Fusion:
    """What a rule's ``build`` returns: the kernel signature, the region's inputs (canonical
    node indices, in the kernel's argument order) and the constants passed after them."""

    signature: str
    inputs: tuple[int, ...]
    consts: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Rule:
    """A named fusion: where ``patterns`` (alternatives) or ``graph_pattern`` match and
    ``build`` accepts, the region becomes one call of kernel op ``kernel_op``."""

    name: str
    family: str
    kernel_op: str
    build: Callable[[Match], Fusion | None]
    patterns: tuple[Pattern, ...] = ()
    graph_pattern: GraphPattern | None = None


@dataclass(frozen=True)
class Rewrite:
    """A helper rewrite: wherever ``lhs`` matches, the e-class also holds ``rhs`` (a
    ``hypatia.*`` op over the same variables). Not a region by itself."""

    name: str
    lhs: Pattern
    rhs: Pattern


@dataclass(frozen=True)
class Family:
    name: str
    rules: tuple[Rule, ...]
    rewrites: tuple[Rewrite, ...] = field(default=())


# -- helpers the families share ------------------------------------------------------------


def int_list(arg: Any) -> list[int] | None:
    """The ints of an encoded list argument ``["l", [...]]``, or None."""
    if isinstance(arg, list) and len(arg) == 2 and arg[0] == "l":
        items = arg[1]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return list(items)
    return None


def tensor_meta(meta: Any) -> tuple[list, str, str] | None:
    """(shape, dtype, device type) of a node's tensor meta, or None for non-tensors."""
    if isinstance(meta, list) and len(meta) == 5 and meta[0] == "T":
        return meta[1], meta[3], meta[4]
    return None


def shape_of(graph: CanonicalGraph, i: int) -> list | None:
    m = tensor_meta(graph.nodes[i].meta)
    return m[0] if m else None


def arg_ref(node, position: int) -> int | None:
    arg = node.args[position] if position < len(node.args) else None
    return arg[1] if is_ref(arg) else None


def scalar(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def last_dim(dims: Any, rank: int) -> bool:
    """True when an encoded dim list (or single dim) is exactly the last dimension."""
    items = int_list(dims) if isinstance(dims, list) else ([dims] if isinstance(dims, int) else None)
    return items is not None and len(items) == 1 and items[0] in (-1, rank - 1)
