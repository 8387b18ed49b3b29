"""Chains of pointwise ops -> one generated kernel.

Not a pattern but a growth rule: from each pointwise node, take in every pointwise producer
whose users are all already inside, until nothing more fits; a region of two or more ops is
a candidate. Inputs broadcast to the root's shape, so a region computes one value per output
element; the program it carries is what :mod:`hypatia.kernels.pointwise` evaluates and
:mod:`hypatia.kernels.pointwise_cuda` compiles.
"""

from __future__ import annotations

from typing import Any

from hypatia.canonical import CanonicalGraph, is_ref
from hypatia.kernels.pointwise_layout import order_of
from hypatia.planner.rules import Fusion, tensor_meta

# ATen op -> program op (same argument order)
UNARY = {
    "aten.neg.default": "neg", "aten.exp.default": "exp", "aten.log.default": "log", "aten.tanh.default": "tanh",
    "aten.sigmoid.default": "sigmoid", "aten.relu.default": "relu", "aten.silu.default": "silu",
    "aten.sqrt.default": "sqrt", "aten.rsqrt.default": "rsqrt", "aten.abs.default": "abs",
}
BINARY = {
    "aten.add.Tensor": "add", "aten.sub.Tensor": "sub", "aten.mul.Tensor": "mul", "aten.div.Tensor": "div",
    "aten.maximum.default": "maximum", "aten.minimum.default": "minimum", "aten.pow.Tensor_Scalar": "pow",
    **{f"aten.{c}.{k}": c for c in ("lt", "le", "gt", "ge", "eq", "ne") for k in ("Tensor", "Scalar")},
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
MAX_INPUTS = 8
MAX_OPS = 64

RULE = "pointwise_chain"


def program_op(node) -> str | None:
    """The program op a canonical node becomes, or None when it is not a pointwise op we fuse."""
    op = node.op
    if op in UNARY and len(node.args) == 1 and not node.kwargs:
        return UNARY[op]
    if op in BINARY and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1 and set(node.kwargs) <= {"alpha"}:
        return BINARY[op]
    if op == "aten.gelu.default" and len(node.args) == 1:
        approx = node.kwargs.get("approximate", "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approx)
    if op == "aten.where.self" and len(node.args) == 3 and not node.kwargs:
        return "where"
    if op == "aten._to_copy.default" and len(node.args) == 1 and set(node.kwargs) == {"dtype"}:
        return "cast"
    if op == "prims.convert_element_type.default" and len(node.args) == 2:
        return "cast"
    return None


def _fusable(graph: CanonicalGraph, i: int) -> bool:
    node = graph.nodes[i]
    m = tensor_meta(node.meta)
    if m is None or program_op(node) is None:
        return False
    return m[1] in FLOAT_DTYPES or m[1] == "bool"


def _operand(arg: Any, inputs: list[int], local: dict[int, int]) -> list | None:
    if is_ref(arg):
        j = arg[1]
        if j in local:
            return ["v", local[j]]
        if j not in inputs:
            inputs.append(j)
        return ["in", inputs.index(j)]
    if isinstance(arg, (int, float, bool)):
        return ["c", arg]
    return None


def program(graph: CanonicalGraph, nodes: list[int], root: int) -> tuple[tuple[int, ...], dict] | None:
    """(inputs, program) for a region, or None if some argument cannot be expressed."""
    inputs: list[int] = []
    local: dict[int, int] = {}
    ops = []
    for i in sorted(nodes):
        node = graph.nodes[i]
        name = program_op(node)
        if name == "cast":
            source = node.args[0]
            dtype = node.kwargs["dtype"] if "dtype" in node.kwargs else node.args[1]
            if not (isinstance(dtype, list) and dtype[0] == "dtype"):
                return None
            operand = _operand(source, inputs, local)
            if operand is None:
                return None
            ops.append(["cast", operand, dtype[1]])
        else:
            operands = [_operand(a, inputs, local) for a in node.args]
            if any(o is None for o in operands):
                return None
            ops.append([name, *operands])
        local[i] = len(ops) - 1
    meta = graph.nodes[root].meta
    shape, dtype, _ = tensor_meta(meta)
    if len(inputs) > MAX_INPUTS or not all(isinstance(s, int) for s in shape):
        return None
    built = {"v": 1, "n_inputs": len(inputs), "ops": ops, "out": local[root], "dtype": dtype, "shape": list(shape)}
    # The output keeps the unfused ops' layout: the graph's later views were traced against it.
    stride = meta[2]
    if isinstance(stride, list) and len(stride) == len(shape) and all(isinstance(s, int) for s in stride):
        order = order_of(shape, stride)
        if order is not None:
            built["order"] = order
    return tuple(inputs), built


def regions(graph: CanonicalGraph, claimed: set[int]) -> list[tuple[int, frozenset[int], Fusion]]:
    """Maximal pointwise regions over unclaimed nodes: (root, nodes, fusion)."""
    users = graph.users_of()
    outputs = graph.output_refs()
    taken: set[int] = set()
    found = []
    for root in range(len(graph.nodes) - 1, -1, -1):
        if root in claimed or root in taken or not _fusable(graph, root):
            continue
        region = {root}
        changed = True
        while changed and len(region) < MAX_OPS:
            changed = False
            for i in sorted(region, reverse=True):
                for arg in graph.nodes[i].args:
                    j = arg[1] if is_ref(arg) else None
                    if j is None or j in region or j in claimed or j in taken or j in outputs or not _fusable(graph, j):
                        continue
                    if all(u in region for u in users[j]):  # j's value is needed nowhere else
                        region.add(j)
                        changed = True
        if len(region) < 2:
            continue
        built = program(graph, sorted(region), root)
        if built is None:
            continue
        taken |= region
        found.append((root, frozenset(region), Fusion("generated", built[0], (built[1],))))
    return found
