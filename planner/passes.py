"""The planner as a flat list of named passes over one canonical graph.

Each pass takes a :class:`PlanState` and returns ``(state, modified)``. Invariants every pass
keeps: regions never overlap (``claimed`` holds every node already in a region); a region's
inputs are outside it; the canonical graph itself is never mutated; eager ATen is what runs
wherever no region applies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from hypatia.canonical import CanonicalGraph
from hypatia.planner.counters import counters
from hypatia.planner.plan import Plan, Region
from hypatia.planner.rules import linear_activation


@dataclass(frozen=True)
class PlanState:
    graph: CanonicalGraph
    regions: tuple[Region, ...] = ()
    claimed: frozenset[int] = frozenset()


def fuse_linear_activation(state: PlanState) -> tuple[PlanState, bool]:
    claimed = set(state.claimed)
    found: list[Region] = []
    for rule in linear_activation.RULES:
        hits = linear_activation.match(state.graph, rule, claimed)
        if hits:
            counters[f"rule.{rule.name}"] += len(hits)
            found.extend(hits)
    if not found:
        return state, False
    return replace(state, regions=state.regions + tuple(found), claimed=frozenset(claimed)), True


PASSES: tuple[tuple[str, Callable[[PlanState], tuple[PlanState, bool]]], ...] = (
    ("fuse_linear_activation", fuse_linear_activation),
)

POLICIES = ("HEURISTIC",)


def plan_graph(graph: CanonicalGraph, policy: str = "HEURISTIC") -> Plan:
    """Run every pass over ``graph`` and return the plan they produce."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; this version knows {', '.join(POLICIES)}")
    state = PlanState(graph)
    for name, run_pass in PASSES:
        state, modified = run_pass(state)
        counters[f"pass.{name}.{'modified' if modified else 'unchanged'}"] += 1
    counters["graphs_planned"] += 1
    fired: dict[str, int] = {}
    for region in state.regions:
        fired[region.rule] = fired.get(region.rule, 0) + 1
    return Plan(graph_key=graph.key, regions=tuple(sorted(state.regions, key=lambda r: r.output)), policy=policy, rules_fired=fired)
