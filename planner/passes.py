"""The planner as a flat list of named passes over one canonical graph.

Each pass takes a :class:`PlanState` and returns ``(state, modified)``. Invariants every pass
keeps: regions never overlap (``claimed`` holds every node already in a region); a region's
inputs are outside it and no value inside it but its output is used outside it; the canonical
graph itself is never mutated; eager ATen is what runs wherever no region applies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

from hypatia.canonical import CanonicalGraph
from hypatia.planner import extract, graph_match
from hypatia.planner.counters import counters
from hypatia.planner.egraph import EGraph, program_for
from hypatia.planner.plan import Plan, Region
from hypatia.planner.rules import Family, attention, conv_bn, linear_activation, mlp, normalization, pointwise

# In the order they run: later families match on earlier families' hypatia.* e-nodes.
FAMILIES: tuple[Family, ...] = (normalization.FAMILY, linear_activation.FAMILY, mlp.FAMILY, attention.FAMILY, conv_bn.FAMILY)


@dataclass(frozen=True)
class PlanState:
    graph: CanonicalGraph
    env: dict | None = None
    regions: tuple[Region, ...] = ()
    claimed: frozenset[int] = frozenset()


def _add(state: PlanState, chosen: list[extract.Candidate]) -> tuple[PlanState, bool]:
    if not chosen:
        return state, False
    claimed = set(state.claimed)
    for c in chosen:
        claimed.update(c.region.nodes)
    return replace(state, regions=state.regions + tuple(c.region for c in chosen), claimed=frozenset(claimed)), True


def rewrite_families(state: PlanState) -> tuple[PlanState, bool]:
    """Run every family on the e-graph (graph patterns through networkx first), then extract."""
    graph = state.graph
    started = time.perf_counter()
    egraph = EGraph(graph, program_for(FAMILIES))
    egraph.run("canonical", iterations=1)
    rules = {}
    for family in FAMILIES:
        for rule in family.rules:
            rules[rule.name] = rule
            if rule.graph_pattern is not None:
                for hit in graph_match.find(graph, rule.graph_pattern):
                    egraph.feed(rule, hit.root, hit.inputs)
        egraph.run(family.name)
    cands = extract.from_hits(graph, egraph.hits(), rules, state.env)
    chosen = extract.select(cands, state.claimed)
    counters["rewrite_seconds"] += time.perf_counter() - started
    return _add(state, chosen)


def fuse_pointwise_chains(state: PlanState) -> tuple[PlanState, bool]:
    """Whatever pointwise chains are left over become generated kernels."""
    graph = state.graph
    cands = []
    for root, nodes, fusion in pointwise.regions(graph, set(state.claimed)):
        counters[f"rule.{pointwise.RULE}.matched"] += 1
        c = extract.candidate(graph, pointwise.RULE, "pointwise", root, nodes, fusion, state.env)
        if c is not None:
            cands.append(c)
    return _add(state, extract.select(cands, state.claimed))


PASSES: tuple[tuple[str, Callable[[PlanState], tuple[PlanState, bool]]], ...] = (
    ("rewrite_families", rewrite_families),
    ("fuse_pointwise_chains", fuse_pointwise_chains),
)

POLICIES = ("HEURISTIC",)


def plan_graph(graph: CanonicalGraph, policy: str = "HEURISTIC", env: dict | None = None) -> Plan:
    """Run every pass over ``graph`` and return the plan they produce."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; this version knows {', '.join(POLICIES)}")
    state = PlanState(graph, env)
    for name, run_pass in PASSES:
        state, modified = run_pass(state)
        counters[f"pass.{name}.{'modified' if modified else 'unchanged'}"] += 1
    counters["graphs_planned"] += 1
    fired: dict[str, int] = {}
    for region in state.regions:
        fired[region.rule] = fired.get(region.rule, 0) + 1
    return Plan(graph_key=graph.key, regions=tuple(sorted(state.regions, key=lambda r: r.output)), policy=policy, rules_fired=fired)
