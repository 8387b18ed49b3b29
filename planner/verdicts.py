"""Validation verdicts per region structure: what a plan may use and what it need not check.

A verdict belongs to a region's structural key (``r1-...``: its math and shapes, not the graph
it came from), an implementation and an environment. A region shape validated once, by the
tuner or by a client in strict mode, in any graph, process or host sharing the store, is never
validated again; one that failed is never planned again in that environment.
"""

from __future__ import annotations

from dataclasses import replace

from hypatia.canonical import CanonicalGraph
from hypatia.planner.extract import Candidate
from hypatia.planner.plan import EAGER, Plan, region_key
from hypatia.planner.store import Store


def _keys(graph: CanonicalGraph, regions) -> dict[int, str]:
    return {r.output: region_key(graph, r) for r in regions}


def excluded(store: Store, env_key: str, graph: CanonicalGraph, cands: list[Candidate],
             legacy: frozenset[tuple[int, str]] = frozenset()) -> frozenset[tuple[int, str]]:
    """(region output, kernel) pairs the plan may not use: their region shape failed in this
    environment with that kernel (``legacy``: those failed for this very plan before)."""
    keys = _keys(graph, [c.region for c in cands])
    found = store.region_verdicts(env_key, sorted(set(keys.values())))
    failed = {(rkey, impl.split("@")[0]) for (rkey, impl), ok in found.items() if not ok}
    return legacy | frozenset(
        (c.region.output, c.region.kernel) for c in cands if (keys[c.region.output], c.region.kernel) in failed
    )


def mark_validated(store: Store, env_key: str, graph: CanonicalGraph, plan: Plan) -> Plan:
    """``plan`` with every region whose shape and implementation passed in this environment
    marked validated (so no client checks it again)."""
    if not plan.regions:
        return plan
    keys = _keys(graph, plan.regions)
    found = store.region_verdicts(env_key, sorted(set(keys.values())))
    passed = {r.output for r in plan.regions if found.get((keys[r.output], r.implementation))}
    if passed <= set(plan.validated):
        return plan
    return replace(plan, validated=tuple(sorted(set(plan.validated) | passed)))


def from_traces(rows: list[dict]) -> list[dict]:
    """The verdicts the tuner's accuracy checks amount to (one per measured implementation)."""
    return [{"region_key": r["region_key"], "implementation_id": r["implementation_id"], "rule": r.get("rule", ""),
             "ok": bool(r["ok"]), "max_rel_err": r.get("max_rel_error") or 0.0, "detail": r.get("detail", "")}
            for r in rows if r.get("region_key") and r.get("implementation_id") != EAGER]
