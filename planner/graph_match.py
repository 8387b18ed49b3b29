"""Non-tree patterns (a value used twice: softmax, layer norm, decomposed GELU) found with
networkx subgraph isomorphism on the canonical graph; the matches are fed to the e-graph."""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
from networkx.algorithms import isomorphism

from hypatia.canonical import COMMUTATIVE, CanonicalGraph, is_ref
from hypatia.planner.rules import GraphPattern

INPUT = "$input"


@dataclass(frozen=True)
class GraphHit:
    root: int
    inputs: dict[str, int]  # pattern input name -> canonical node


def _edge_slot(op: str, position: int) -> object:
    # Canonical order may have swapped a commutative op's first two arguments.
    return "c" if op in COMMUTATIVE and position < 2 else position


def host_graph(graph: CanonicalGraph, ops: frozenset[str]) -> nx.DiGraph:
    """The graph networkx searches: nodes whose op a pattern names, plus their direct
    arguments (which may be pattern inputs); an edge per argument slot."""
    g = nx.DiGraph()
    for i, node in enumerate(graph.nodes):
        if node.op not in ops:
            continue
        g.add_node(i, op=node.op)
        for position, arg in enumerate(node.args):
            if is_ref(arg):
                j = arg[1]
                if j not in g:
                    g.add_node(j, op=graph.nodes[j].op)
                g.add_edge(j, i, slot=_edge_slot(node.op, position))
    return g


def pattern_graph(pattern: GraphPattern) -> tuple[nx.DiGraph, list[str]]:
    p = nx.DiGraph()
    inputs: list[str] = []
    for name, (op, children) in pattern.nodes.items():
        p.add_node(name, op=op)
    for name, (op, children) in pattern.nodes.items():
        for position, child in enumerate(children):
            if child == "_":
                continue
            if child.startswith("$"):
                if child not in p:
                    p.add_node(child, op=None)
                    inputs.append(child[1:])
            p.add_edge(child, name, slot=_edge_slot(op, position))
    return p, inputs


def _node_match(host: dict, pat: dict) -> bool:
    return pat["op"] is None or host["op"] == pat["op"]


def _edge_match(host: dict, pat: dict) -> bool:
    return host["slot"] == pat["slot"]


def find(graph: CanonicalGraph, pattern: GraphPattern, host: nx.DiGraph | None = None) -> list[GraphHit]:
    """Every distinct place where ``pattern`` occurs in ``graph``."""
    ops = frozenset(op for op, _ in pattern.nodes.values())
    if not ops <= {n.op for n in graph.nodes}:
        return []  # some op the pattern needs is absent: skip the search entirely
    p, inputs = pattern_graph(pattern)
    host = host if host is not None else host_graph(graph, ops)
    matcher = isomorphism.DiGraphMatcher(host, p, node_match=_node_match, edge_match=_edge_match)
    seen: set[tuple] = set()
    hits = []
    for mapping in matcher.subgraph_monomorphisms_iter():
        by_name = {name: i for i, name in mapping.items()}
        root = by_name[pattern.root]
        found = {n: by_name["$" + n] for n in inputs}
        key = (root, tuple(sorted(found.items())))
        if key not in seen:
            seen.add(key)
            hits.append(GraphHit(root, found))
    return hits
