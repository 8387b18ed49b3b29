"""Canonical graphs and their keys.

A canonical graph is a captured ATen graph with everything that does not change the math taken
out: node names, the order in which independent nodes were traced, the order of commutative
arguments, the device index and the rank. What stays is, per node, the op, the arguments
(references to earlier nodes or tagged constants) and the tensor meta (shape, stride, dtype,
device *type*). Keys are Merkle hashes with a kind prefix (``g1-`` graph, ``w1-`` workload,
``e1-`` environment); :class:`KeyDetails` explains which field made two keys differ.

This module is pure Python: the client turns an FX graph into :class:`RawNode` values and the
daemon receives the result as plain msgpack data (:meth:`CanonicalGraph.to_wire`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import msgpack

KEY_VERSION = 1

# Ops whose first two positional arguments may be swapped without changing the result.
# aten.add.Tensor only while alpha is absent (add(a, b, alpha=2) is not symmetric).
COMMUTATIVE = frozenset(
    {
        "aten.add.Tensor",
        "aten.mul.Tensor",
        "aten.maximum.default",
        "aten.minimum.default",
        "aten.eq.Tensor",
        "aten.ne.Tensor",
        "aten.logical_and.default",
        "aten.logical_or.default",
        "aten.logical_xor.default",
        "aten.bitwise_and.Tensor",
        "aten.bitwise_or.Tensor",
        "aten.bitwise_xor.Tensor",
    }
)


class GraphFormatError(ValueError):
    """A wire-form canonical graph is malformed (bad types, forward references)."""


def is_ref(arg: Any) -> bool:
    return isinstance(arg, list) and len(arg) == 2 and arg[0] == "n" and isinstance(arg[1], int)


def refs(arg: Any) -> Iterable[int]:
    """Every node index referenced anywhere inside an encoded argument."""
    stack = [arg]
    while stack:
        item = stack.pop()
        if is_ref(item):
            yield item[1]
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())


def map_refs(arg: Any, fn) -> Any:
    """A copy of ``arg`` with every reference ``["n", i]`` replaced by ``fn(i)``."""
    if is_ref(arg):
        return fn(arg[1])
    if isinstance(arg, list):
        return [map_refs(a, fn) for a in arg]
    return arg


@dataclass(frozen=True)
class RawNode:
    """One captured node before canonical ordering; ``["n", i]`` refers to raw node ``i``."""

    op: str
    args: list
    kwargs: dict
    meta: Any


@dataclass(frozen=True)
class Node:
    """One canonical node; ``["n", i]`` in its arguments refers to canonical node ``i < self``."""

    op: str
    args: list
    kwargs: dict
    meta: Any
    users: int


def _digest(obj: Any) -> str:
    return hashlib.sha256(msgpack.packb(obj, use_bin_type=True)).hexdigest()


def _node_key(op: str, args: list, kwargs: dict, meta: Any, child_key) -> str:
    keyed_args = map_refs(args, lambda i: ["k", child_key(i)])
    keyed_kwargs = [[k, map_refs(kwargs[k], lambda i: ["k", child_key(i)])] for k in sorted(kwargs)]
    return _digest([op, keyed_args, keyed_kwargs, meta])


def _order_commutative(op: str, args: list, kwargs: dict, sort_key) -> list:
    if op not in COMMUTATIVE or len(args) < 2 or kwargs.get("alpha", 1) != 1:
        return args
    a, b = args[0], args[1]
    if sort_key(b) < sort_key(a):
        return [b, a, *args[2:]]
    return args


def _arg_sort_key(arg: Any, key_of) -> str:
    return "k" + key_of(arg[1]) if is_ref(arg) else "c" + _digest(arg)


@dataclass(frozen=True)
class KeyDetails:
    """The named fields a key was built from; ``debug_lines`` prints one per field."""

    kind: str
    fields: tuple[tuple[str, Any], ...]

    def debug_lines(self) -> list[str]:
        return [f"[{self.kind}] {name}: {value!r}"[:400] for name, value in self.fields]

    def differences(self, other: "KeyDetails") -> list[str]:
        """The fields whose values differ between two key details, named and shown side by side."""
        mine, theirs = dict(self.fields), dict(other.fields)
        lines = []
        for name in list(mine) + [n for n in theirs if n not in mine]:
            if mine.get(name, "<absent>") != theirs.get(name, "<absent>"):
                lines.append(
                    f"[{self.kind}] {name}: {mine.get(name, '<absent>')!r} != {theirs.get(name, '<absent>')!r}"[:400]
                )
        return lines


def meta_fields(prefix: str, meta: Any) -> list[tuple[str, Any]]:
    """Named fields of an encoded meta value, so key details can name shape, stride, dtype, device."""
    if isinstance(meta, list) and meta and meta[0] == "T":
        _, shape, stride, dtype, device = meta
        return [
            (f"{prefix}.shape", shape),
            (f"{prefix}.stride", stride),
            (f"{prefix}.dtype", dtype),
            (f"{prefix}.device", device),
        ]
    if isinstance(meta, list) and meta and meta[0] == "tuple":
        out: list[tuple[str, Any]] = []
        for j, m in enumerate(meta[1]):
            out.extend(meta_fields(f"{prefix}[{j}]", m))
        return out
    return [(f"{prefix}.meta", meta)]


@dataclass(frozen=True)
class CanonicalGraph:
    """Nodes in canonical order (placeholders first, then a structural post-order), the
    encoded outputs, and the per-node Merkle keys."""

    nodes: tuple[Node, ...]
    outputs: Any
    node_keys: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"g{KEY_VERSION}-" + _digest(["graph", list(self.node_keys), self._keyed_outputs()])

    def _keyed_outputs(self) -> Any:
        return map_refs(self.outputs, lambda i: ["k", self.node_keys[i]])

    def details(self) -> KeyDetails:
        fields: list[tuple[str, Any]] = []
        for i, node in enumerate(self.nodes):
            fields.append((f"node {i} op", node.op))
            fields.append((f"node {i} ({node.op}) args", node.args))
            if node.kwargs:
                fields.append((f"node {i} ({node.op}) kwargs", node.kwargs))
            fields.extend(meta_fields(f"node {i} ({node.op})", node.meta))
        fields.append(("outputs", self.outputs))
        return KeyDetails("graph", tuple(fields))

    def placeholders(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.op == "placeholder"]

    def output_refs(self) -> set[int]:
        return set(refs(self.outputs))

    def users_of(self) -> list[list[int]]:
        """For each node, the canonical indices of the nodes that use it."""
        users: list[list[int]] = [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes):
            for j in set(refs(node.args)) | set(refs(list(node.kwargs.values()))):
                users[j].append(i)
        return users

    def to_wire(self) -> dict:
        return {
            "nodes": [[n.op, n.args, n.kwargs, n.meta] for n in self.nodes],
            "outputs": self.outputs,
        }

    @classmethod
    def from_wire(cls, data: Any) -> "CanonicalGraph":
        """Rebuild and re-key a graph received from a peer; refuses malformed input."""
        if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
            raise GraphFormatError("graph must be a map with a 'nodes' list")
        items = data["nodes"]
        users = [0] * len(items)
        keys: list[str] = []
        for i, item in enumerate(items):
            if not (isinstance(item, list) and len(item) == 4):
                raise GraphFormatError(f"node {i} is not [op, args, kwargs, meta]")
            op, args, kwargs, meta = item
            if not isinstance(op, str) or not isinstance(args, list) or not isinstance(kwargs, dict):
                raise GraphFormatError(f"node {i} has fields of the wrong type")
            for j in [*refs(args), *refs(list(kwargs.values()))]:
                if not 0 <= j < i:
                    raise GraphFormatError(f"node {i} refers to node {j}, which is not before it")
                users[j] += 1
            keys.append(_node_key(op, args, kwargs, meta, keys.__getitem__))
        outputs = data.get("outputs")
        for j in refs(outputs):
            if not 0 <= j < len(items):
                raise GraphFormatError(f"outputs refer to node {j}, which does not exist")
            users[j] += 1
        nodes = tuple(Node(op, args, kwargs, meta, users[i]) for i, (op, args, kwargs, meta) in enumerate(items))
        return cls(nodes, outputs, tuple(keys))


def canonicalize(raw: Sequence[RawNode], outputs: Any) -> tuple[CanonicalGraph, list[int]]:
    """Put captured nodes in canonical form; returns the graph and, per canonical index, the raw
    index it came from. ``raw`` must be topologically ordered (as FX graphs are)."""
    raw_keys: list[str] = []
    args_of: list[list] = []
    for node in raw:
        key_of = raw_keys.__getitem__
        args = _order_commutative(node.op, node.args, node.kwargs, lambda a: _arg_sort_key(a, key_of))
        args_of.append(args)
        raw_keys.append(_node_key(node.op, args, node.kwargs, node.meta, key_of))

    # Canonical order: placeholders in input order, then a post-order walk from the outputs
    # (children in canonical argument order), then anything unreachable in captured order.
    order: list[int] = [i for i, n in enumerate(raw) if n.op == "placeholder"]
    placed = set(order)
    roots = list(refs_in_order(outputs)) + list(range(len(raw)))
    for root in roots:
        if root in placed:
            continue
        stack: list[tuple[int, bool]] = [(root, False)]
        while stack:
            idx, expanded = stack.pop()
            if idx in placed:
                continue
            if expanded:
                placed.add(idx)
                order.append(idx)
                continue
            stack.append((idx, True))
            children = list(refs_in_order(args_of[idx])) + list(refs_in_order(list(raw[idx].kwargs.values())))
            for child in reversed(children):
                if child not in placed:
                    stack.append((child, False))

    position = {raw_idx: canon_idx for canon_idx, raw_idx in enumerate(order)}
    users = [0] * len(raw)
    for i in range(len(raw)):
        for j in [*refs(args_of[i]), *refs(list(raw[i].kwargs.values()))]:
            users[j] += 1
    for j in refs(outputs):
        users[j] += 1
    remap = lambda i: ["n", position[i]]  # noqa: E731
    nodes = tuple(
        Node(
            raw[r].op,
            map_refs(args_of[r], remap),
            {k: map_refs(v, remap) for k, v in raw[r].kwargs.items()},
            raw[r].meta,
            users[r],
        )
        for r in order
    )
    graph = CanonicalGraph(nodes, map_refs(outputs, remap), tuple(raw_keys[r] for r in order))
    return graph, order


def refs_in_order(arg: Any) -> Iterable[int]:
    """References inside an encoded argument, depth first, left to right."""
    if is_ref(arg):
        yield arg[1]
    elif isinstance(arg, list):
        for a in arg:
            yield from refs_in_order(a)


def workload_key(input_metas: Sequence[Any]) -> tuple[str, KeyDetails]:
    """Key of the concrete inputs (shapes, strides, dtypes) a graph is run with."""
    fields: list[tuple[str, Any]] = []
    for i, meta in enumerate(input_metas):
        fields.extend(meta_fields(f"input {i}", meta))
    return f"w{KEY_VERSION}-" + _digest(["workload", list(input_metas)]), KeyDetails("workload", tuple(fields))


def workload_phase(input_metas: Sequence[Any]) -> str | None:
    """"training" (forward and backward) or "inference" where the workload names its phase."""
    last = input_metas[-1] if input_metas else None
    if isinstance(last, list) and len(last) >= 2 and last[0] == "phase" and last[1] in ("training", "inference"):
        return last[1]
    return None


def environment_key(env: dict) -> tuple[str, KeyDetails]:
    """Key of the hardware and software a plan is valid for (never a device index or rank)."""
    items = sorted((str(k), env[k]) for k in env)
    return f"e{KEY_VERSION}-" + _digest(["environment", items]), KeyDetails("environment", tuple(items))
