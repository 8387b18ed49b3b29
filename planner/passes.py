"""The planner as a flat list of named passes over one canonical graph.

Each pass takes a :class:`PlanState` and returns ``(state, modified)``. The first two find
candidate regions (the e-graph families, then pointwise chains over what the families' greedy
choice left); the last lays every candidate's alternatives out as a path graph and takes the
cheapest path under the policy's costs. Invariants every pass keeps: chosen regions never
overlap; a region's inputs are outside it and no value inside it but its output is used
outside it; the canonical graph itself is never mutated; eager ATen is what runs wherever no
region applies, and it is always one of the alternatives.

Policies: ``HEURISTIC`` costs everything with the static model (measured ceilings where the
environment has them); ``FASTEST`` uses measurements where they exist and the model elsewhere;
``EXPLORE`` is FASTEST after the tuner has measured every candidate (the daemon does that
before answering).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

from hypatia.canonical import CanonicalGraph
from hypatia.config import POLICIES
from hypatia.planner import costs, extract, graph_match, paths
from hypatia.planner.counters import counters
from hypatia.planner.egraph import EGraph, program_for
from hypatia.planner.plan import Decision, Plan, Region
from hypatia.planner.rules import Family, attention, conv_bn, linear_activation, mlp, normalization, pointwise

# In the order they run: later families match on earlier families' hypatia.* e-nodes.
FAMILIES: tuple[Family, ...] = (normalization.FAMILY, linear_activation.FAMILY, mlp.FAMILY, attention.FAMILY, conv_bn.FAMILY)


@dataclass(frozen=True)
class PlanState:
    graph: CanonicalGraph
    env: dict | None = None
    model: costs.CostModel = costs.cost_model()
    measured: paths.Measurements | None = None
    candidates: tuple[extract.Candidate, ...] = ()
    claimed: frozenset[int] = frozenset()  # nodes of the greedy choice, which later finders skip
    excluded: frozenset[tuple[int, str]] = frozenset()  # (output, kernel) that failed validation
    regions: tuple[Region, ...] = ()
    decisions: tuple[Decision, ...] = ()


def _add(state: PlanState, cands: list[extract.Candidate]) -> tuple[PlanState, bool]:
    if not cands:
        return state, False
    claimed = set(state.claimed)
    for c in extract.select(cands, state.claimed):
        claimed.update(c.region.nodes)
    return replace(state, candidates=state.candidates + tuple(cands), claimed=frozenset(claimed)), True


def rewrite_families(state: PlanState) -> tuple[PlanState, bool]:
    """Run every family on the e-graph (graph patterns through networkx first), then extract."""
    graph = state.graph
    started = time.perf_counter()
    egraph = EGraph(graph, program_for(FAMILIES))
    try:
        egraph.run("canonical", iterations=1)
        rules = {}
        for family in FAMILIES:
            for rule in family.rules:
                rules[rule.name] = rule
                if rule.graph_pattern is not None:
                    for hit in graph_match.find(graph, rule.graph_pattern):
                        egraph.feed(rule, hit.root, hit.inputs)
            report = egraph.run(family.name)
            for rewrite in family.rewrites:  # how often each spelling was seen, per rewrite
                if report.get(rewrite.name):
                    counters[f"rewrite.{rewrite.name}.matched"] += report[rewrite.name]
        hits = egraph.hits()
    finally:
        egraph.close()
    cands = extract.from_hits(graph, hits, rules, state.env, state.model)
    counters["rewrite_seconds"] += time.perf_counter() - started
    return _add(state, cands)


def fuse_pointwise_chains(state: PlanState) -> tuple[PlanState, bool]:
    """Whatever pointwise chains are left over become generated kernels."""
    graph = state.graph
    cands = []
    for root, nodes, fusion in pointwise.regions(graph, set(state.claimed)):
        counters[f"rule.{pointwise.RULE}.matched"] += 1
        c = extract.candidate(graph, pointwise.RULE, "pointwise", root, nodes, fusion, state.env, state.model)
        if c is not None:
            cands.append(c)
    return _add(state, cands)


def choose_paths(state: PlanState) -> tuple[PlanState, bool]:
    """The cheapest path through every candidate's alternatives (eager ATen among them)."""
    started = time.perf_counter()
    chosen, decisions = paths.choose(state.graph, list(state.candidates), state.env, state.model, state.measured,
                                     state.excluded)
    counters["path_seconds"] += time.perf_counter() - started
    regions = tuple(sorted((c.region for c in chosen), key=lambda r: r.output))
    return replace(state, regions=regions, decisions=tuple(decisions)), bool(regions)


PASSES: tuple[tuple[str, Callable[[PlanState], tuple[PlanState, bool]]], ...] = (
    ("rewrite_families", rewrite_families),
    ("fuse_pointwise_chains", fuse_pointwise_chains),
    ("choose_paths", choose_paths),
)



class UnknownPolicy(ValueError):
    """HYPATIA_POLICY (or a request) names a policy this version does not have."""


def candidates(graph: CanonicalGraph, env: dict | None = None, ceilings: dict | None = None) -> PlanState:
    """The state after the passes that find candidates (every pass but the path choice)."""
    state = PlanState(graph, env, costs.cost_model(ceilings))
    for name, run_pass in PASSES[:-1]:
        state, modified = run_pass(state)
        counters[f"pass.{name}.{'modified' if modified else 'unchanged'}"] += 1
    return state


def finish(state: PlanState, policy: str, measured: paths.Measurements | None = None,
           excluded: frozenset[tuple[int, str]] = frozenset()) -> Plan:
    """The plan from a state with its candidates: the path choice under ``policy``, never using
    an ``excluded`` (region output, kernel) pair."""
    if policy not in POLICIES:
        raise UnknownPolicy(f"unknown policy {policy!r}; this version knows {', '.join(POLICIES)}")
    if policy == "HEURISTIC":
        measured = None
    name, run_pass = PASSES[-1]
    state, modified = run_pass(replace(state, measured=measured, excluded=excluded))
    counters[f"pass.{name}.{'modified' if modified else 'unchanged'}"] += 1
    counters["graphs_planned"] += 1
    fired: dict[str, int] = {}
    for region in state.regions:
        fired[region.rule] = fired.get(region.rule, 0) + 1
        counters[f"rule.{region.rule}.fired"] += 1
    return Plan(graph_key=state.graph.key, regions=state.regions, policy="HEURISTIC" if measured is None else policy,
                rules_fired=fired, tuned=measured is not None, decisions=state.decisions)


def plan_graph(graph: CanonicalGraph, policy: str = "HEURISTIC", env: dict | None = None,
               ceilings: dict | None = None, measured: paths.Measurements | None = None) -> Plan:
    """Run every pass over ``graph`` and return the plan they produce. ``ceilings`` are the
    environment's measured ones; ``measured`` (ignored by HEURISTIC) the tuner's results."""
    if policy not in POLICIES:
        raise UnknownPolicy(f"unknown policy {policy!r}; this version knows {', '.join(POLICIES)}")
    return finish(candidates(graph, env, ceilings), policy, measured)
