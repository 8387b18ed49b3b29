"""Extraction: from the e-graph's candidate regions, the cheapest non-overlapping set.

Each hit becomes a candidate when its region is well formed (no inner value escapes), its
rule accepts it, and the kernel registry has an implementation for the device; its saving is
the cost model's eager cost of the region's nodes minus the fused kernel's cost. Candidates
are taken greedily by saving (larger regions first on ties), skipping any that overlaps one
already taken, and only where the saving is positive.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypatia.canonical import CanonicalGraph
from hypatia.kernels import lookup
from hypatia.kernels.registry import Backend, DEVICE_BACKENDS
from hypatia.planner import costs
from hypatia.planner.counters import counters
from hypatia.planner.egraph import Hit, closure
from hypatia.planner.plan import Region
from hypatia.planner.rules import Fusion, Match, Rule

MAX_REGION_NODES = 96


@dataclass(frozen=True)
class Candidate:
    """A region that may be fused: its default implementation (the device's own backend) and
    the static model's saving for it; the path planner also tries the other backends that
    have ``(kernel_op, signature)``."""

    rule: str
    region: Region
    saving: float
    kernel_op: str = ""
    signature: str = ""


def well_formed(graph: CanonicalGraph, users: list[list[int]], root: int, nodes: frozenset[int]) -> bool:
    """No value computed inside the region other than the root is used outside it."""
    outputs = graph.output_refs()
    for i in nodes:
        if i == root:
            continue
        if i in outputs or any(u not in nodes and not dead(graph, users, u) for u in users[i]):
            return False
    return True


def dead(graph: CanonicalGraph, users: list[list[int]], i: int) -> bool:
    """A getitem nobody reads (tracers leave the unused half of ``max.dim`` behind)."""
    return graph.nodes[i].op == "_operator.getitem" and not users[i] and i not in graph.output_refs()


def backend_for(graph: CanonicalGraph, root: int, kernel_op: str, env: dict | None) -> Backend | None:
    device = costs.node_device(graph, root)
    if kernel_op == "pointwise" and device == "cuda" and (env or {}).get("cupy"):
        return Backend.GPU_CUPY
    return DEVICE_BACKENDS.get(device)


def candidate(graph: CanonicalGraph, rule: Rule | str, kernel_op: str, root: int, nodes: frozenset[int],
              fusion: Fusion, env: dict | None, model: costs.CostModel) -> Candidate | None:
    name = rule if isinstance(rule, str) else rule.name
    backend = backend_for(graph, root, kernel_op, env)
    spec = lookup(kernel_op, backend, fusion.signature) if backend else None
    if spec is None:
        counters[f"rule.{name}.no_kernel"] += 1
        return None
    ceilings = model.ceilings(costs.node_device(graph, root))
    eager = sum(costs.node_cost(graph, i, ceilings) for i in nodes)
    fused = costs.region_cost(graph, nodes, fusion.inputs, root, spec.launches, ceilings)
    region = Region(rule=name, kernel=spec.id, inputs=fusion.inputs, consts=fusion.consts, output=root, nodes=tuple(sorted(nodes)))
    return Candidate(name, region, eager - fused, kernel_op, fusion.signature)


def from_hits(graph: CanonicalGraph, hits: list[Hit], rules: dict[str, Rule], env: dict | None,
              model: costs.CostModel) -> list[Candidate]:
    users = graph.users_of()
    found: dict[tuple, Candidate] = {}
    for hit in hits:
        rule = rules[hit.rule]
        counters[f"rule.{rule.name}.matched"] += 1
        nodes = closure(graph, hit.root, hit.inputs.values())
        if nodes is None or len(nodes) > MAX_REGION_NODES or not well_formed(graph, users, hit.root, nodes):
            counters[f"rule.{rule.name}.rejected"] += 1
            continue
        fusion = rule.build(Match(graph, hit.root, dict(hit.inputs), nodes))
        if fusion is None:
            counters[f"rule.{rule.name}.rejected"] += 1
            continue
        c = candidate(graph, rule, rule.kernel_op, hit.root, nodes, fusion, env, model)
        if c is not None:
            found.setdefault((c.region.output, c.region.nodes, c.rule), c)
    return list(found.values())


def select(cands: list[Candidate], claimed: frozenset[int] = frozenset()) -> list[Candidate]:
    """The greedy cost-based choice of non-overlapping regions (what later passes build on;
    the path planner makes the final choice)."""
    taken = set(claimed)
    chosen = []
    for c in sorted(cands, key=lambda c: (-c.saving, -len(c.region.nodes), c.region.output, c.rule)):
        if c.saving <= 0 or taken.intersection(c.region.nodes):
            continue
        taken.update(c.region.nodes)
        chosen.append(c)
    return chosen
