"""What a process's compiles did, said for people: the one-line fusion summary
(``hypatia.client.summary()``, ``HYPATIA_SUMMARY=1``) and the plan as ``HYPATIA_DEBUG_FX=1``
prints it."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from hypatia.planner.plan import Plan


def fusion_summary(plans: Iterable[tuple[tuple[str, str, str], Plan]]) -> str:
    """Every fused region's rule with its count over the distinct plans (by their keys), most
    frequent first: ``rms_norm x2, attention_fill_mask, linear_silu``; ``nothing fused``."""
    latest = dict(plans)  # a graph compiled again counts once, with the plan it runs now
    counts = Counter(region.rule for plan in latest.values() for region in plan.regions)
    return ", ".join(rule if n == 1 else f"{rule} x{n}" for rule, n in counts.most_common()) or "nothing fused"


def debug_fx_plan(plan: Plan, phase: str, model: str, from_daemon: bool) -> str:
    """A plan for reading: a header line, then one line per fused region (rule, kernel, the
    canonical nodes it replaces and the node its result stands for)."""
    source = "from the daemon" if from_daemon else "planned in this process"
    header = (f"plan for the {phase} graph {plan.graph_key[:19]}" + (f" of {model}" if model else "")
              + f" ({source}; revision {plan.revision}, policy {plan.policy}, "
              + ("tuned" if plan.tuned else "not tuned") + f"): {len(plan.regions)} fused region(s)")
    lines = [header]
    width = max((len(r.rule) for r in plan.regions), default=0)
    for r in plan.regions:
        where = "" if r.placement == "device" else f" on the {r.placement}"
        lines.append(f"  {r.rule:<{width}}  {r.kernel}{where}  nodes {_ranges(r.nodes)} -> {r.output}")
    if not plan.regions:
        lines.append("  none: the graph runs as eager ATen operators")
    if plan.executor is not None:
        lines.append(f"  executor: {plan.executor.chosen} (measured)")
    return "\n".join(lines)


def _ranges(nodes: Iterable[int]) -> str:
    """``3-7, 9``: sorted node indices with runs collapsed."""
    out: list[str] = []
    for n in sorted(set(nodes)):
        if out and out[-1].rsplit("-", 1)[-1] == str(n - 1):
            start = out[-1].split("-")[0]
            out[-1] = f"{start}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out)
