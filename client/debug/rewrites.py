"""``rewrites.json``: the rewrites that matched, were rejected (and why) and fired for one graph.

A plan keeps what it fired (its regions) and one decision per candidate region (what the path
planner chose for it, eager ATen among the choices, at what cost); it does not keep the rule
matches refused before they became candidates. Those are found by running the planner's
candidate passes once more on the graph, in this process, with the planner's counters left as
they were: their ``rule.*.rejected`` (region not well formed, or the rule refused the match)
and ``rule.*.no_kernel`` (no kernel for the device) counts. Validation failures come from the
compile's own verdicts.
"""

from __future__ import annotations

from collections import Counter

from hypatia.debug.trail import Trail
from hypatia.planner.plan import EAGER

SOURCE = ("fired: the plan's regions; matched: the candidate regions of the planner's passes, run again on this "
          "graph in this process; rejected: the candidates the path planner left to eager ATen (from the plan's "
          "decisions), the matches refused before becoming candidates (counted per rule and reason, by the same "
          "run), and the regions that failed validation in this compile")

REFUSALS = {
    "rejected": "the match was refused: its region is not well formed (an inner value is used outside it, or it is "
                "too large) or the rule's conditions do not hold",
    "no_kernel": "no kernel implements it for this device",
}


def _candidates(trail: Trail) -> tuple[list, Counter]:
    """The planner's candidates for the trail's graph and the refusal counts of the same run."""
    from hypatia.planner import passes
    from hypatia.planner.counters import counters

    saved = Counter(counters)
    try:
        state = passes.candidates(trail.graph, trail.env)
        delta = Counter({k: v - saved.get(k, 0) for k, v in counters.items() if v != saved.get(k, 0)})
    finally:
        counters.clear()
        counters.update(saved)
    return list(state.candidates), delta


def rewrites(trail: Trail) -> dict:
    """The content of ``rewrites.json`` for a planned graph."""
    plan = trail.plan
    fired = [{"rule": r.rule, "kernel": r.kernel, "placement": r.placement, "output": r.output, "nodes": list(r.nodes)}
             for r in plan.regions]
    matched, rejected, note = [], [], ""
    cands, refusals = [], Counter()
    if trail.graph is not None:
        try:
            cands, refusals = _candidates(trail)
        except Exception as exc:  # noqa: BLE001 - the plan's decisions still say most of it
            note = f"the candidate passes could not run again: {type(exc).__name__}: {exc}"
    for c in cands:
        matched.append({"rule": c.rule, "kernel": c.region.kernel, "output": c.region.output,
                        "nodes": list(c.region.nodes), "saving_us": round(c.saving * 1e6, 3)})
    by_candidate = {(c.rule, c.region.output): c for c in cands}
    for d in plan.decisions:
        if d.chosen != EAGER:
            continue
        cand = by_candidate.get((d.rule, d.output))
        overlap = [r for r in plan.regions if cand is not None and set(r.nodes) & set(cand.region.nodes)]
        if overlap:
            reason = f"overlaps the chosen region {overlap[0].rule} at node {overlap[0].output}"
        else:
            tag = "measured" if d.measured else "estimated"
            reason = f"fusing it saves nothing over its eager ops ({d.eager_s * 1e6:.3f} us eager, {tag})"
        rejected.append({"rule": d.rule, "output": d.output, "reason": f"the path planner kept eager ATen: {reason}",
                         "stage": "path"})
    for key, count in sorted(refusals.items()):
        rule, _, what = key.removeprefix("rule.").rpartition(".")
        if key.startswith("rule.") and what in REFUSALS and count:
            rejected.append({"rule": rule, "reason": REFUSALS[what], "count": count, "stage": what})
    kept = {r.output for r in plan.regions}
    dropped = [r for r in getattr(trail.planned, "regions", ()) if r.output not in kept]
    for v in trail.verdicts:
        if not v.ok:
            rejected.append({"rule": v.rule, "kernel": v.kernel, "output": v.region, "stage": "validation",
                             "reason": f"failed validation and runs unfused: {v.detail}"})
    out = {"fired": fired, "rejected": rejected, "matched": matched, "source": SOURCE,
           "dropped_by_validation": len(dropped)}
    if note:
        out["note"] = note
    return out
