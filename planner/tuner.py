"""The tuner: measure every candidate region's implementations (eager ATen among them) on
synthetic inputs, record each result as a benchmark trace, and plan with the measurements.

Measurements are keyed by the region's structure and the environment, so a region any process
on the host (or, with a shared store, the cluster) has measured is never measured again. The
device's ceilings are measured once per environment, before its first tuning.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from hypatia.canonical import CanonicalGraph
from hypatia.kernels import load_kernel
from hypatia.planner import budget, costs, measure, paths, regions, verdicts
from hypatia.planner.counters import counters
from hypatia.planner.environment import describe
from hypatia.planner.extract import Candidate
from hypatia.planner.passes import candidates, finish
from hypatia.planner.plan import EAGER, Plan, Region, region_key
from hypatia.planner.store import Store

log = logging.getLogger("hypatia.tuner")


class EnvironmentMismatch(Exception):
    """The plan is for another environment than the one this process can measure."""

    skip = True  # the daemon counts it as skipped, not failed


@dataclass
class TuneReport:
    measured: int = 0  # traces written now
    reused: int = 0  # traces found already measured
    unmeasurable: list[str] = field(default_factory=list)
    over_budget: list[str] = field(default_factory=list)  # regions skipped for the memory budget


def ensure_ceilings(store: Store, env_key: str, env: dict) -> dict:
    """The environment's measured ceilings, measuring them if this is its first tuning."""
    found = store.ceilings(env_key)
    if found is None:
        found = measure.ceilings(str(env.get("device_type", "cpu")))
        store.set_ceilings(env_key, env, found)
        counters["ceilings_measured"] += 1
        log.info("measured ceilings of %s: %s", env.get("device_name"), found)
    return found


def _device(graph: CanonicalGraph, region: Region) -> torch.device:
    kind = costs.node_device(graph, region.output)
    return torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)


def _measure_candidate(graph: CanonicalGraph, cand: Candidate, options: list[Region], budget_s: float) -> list[dict]:
    """One trace row per option (eager first) for one candidate region."""
    device = _device(graph, cand.region)
    eager = regions.eager_callable(graph, cand.region, device)
    draws = [regions.synthetic_inputs(graph, cand.region, device, positive) for positive in (False, True)]
    rkey = region_key(graph, cand.region)
    reference = regions.Reference(eager, draws)
    rows = []
    for region in [Region(cand.rule, EAGER, cand.region.inputs, (), cand.region.output, cand.region.nodes), *options]:
        row = {"region": region.output, "region_key": rkey, "rule": cand.rule, "implementation_id": region.implementation}
        try:
            if region.kernel == EAGER:
                fn = eager
            else:
                kernel, consts = load_kernel(region.kernel, region.placement), region.consts
                fn = lambda *xs, kernel=kernel, consts=consts: kernel(*xs, *consts)  # noqa: E731
            accuracy = regions.check(fn, reference)
            timing = measure.time_call(fn, draws[0], device.type, budget_s=budget_s)
            row |= {"median_us": timing.median_s * 1e6, "spread_us": timing.spread_s * 1e6, "repeats": timing.repeats,
                    "max_rel_error": accuracy.max_rel_err, "ok": int(accuracy.ok),
                    "detail": "" if accuracy.ok else accuracy.detail[:500]}
        except Exception as exc:  # noqa: BLE001 - a kernel that fails here is never chosen
            row |= {"median_us": None, "spread_us": None, "repeats": 0, "max_rel_error": None, "ok": 0,
                    "detail": f"{type(exc).__name__}: {exc}"[:500]}
        rows.append(row)
    return rows


def tune(graph: CanonicalGraph, keys: tuple[str, str, str], env: dict, store: Store, *, policy: str = "FASTEST",
         budget_s: float = 0.1, memory_bytes: int = 0, report: TuneReport | None = None) -> Plan:
    """Measure what is not yet measured for ``graph`` and return the plan the measurements
    choose. A region whose inputs would take more than ``memory_bytes`` (0: no limit) is not
    allocated; it keeps its heuristic choice, and when that leaves nothing measured the tuning
    raises :class:`~hypatia.planner.budget.OverBudget`. Raises :class:`EnvironmentMismatch`
    when ``env`` is not this process's own."""
    device_type = str(env.get("device_type", "cpu"))
    own_key, _ = describe(device_type, torch.cuda.current_device() if device_type == "cuda" and torch.cuda.is_available() else 0)
    if own_key != keys[2]:
        raise EnvironmentMismatch(
            f"the plan is for environment {keys[2][:16]}, this daemon measures {own_key[:16]} "
            "(different hardware or versions); run hypatiad in the same environment as the model")
    report = report if report is not None else TuneReport()
    started = time.perf_counter()
    ceilings = ensure_ceilings(store, keys[2], env)
    state = candidates(graph, env, ceilings)
    by_key: dict[str, tuple[Candidate, list[Region]]] = {}
    for cand in state.candidates:
        by_key.setdefault(region_key(graph, cand.region), (cand, paths.implementations(graph, cand, env)))
    stored = store.traces(keys[2], list(by_key))
    rows, impls = [], {}
    for rkey, (cand, options) in by_key.items():
        wanted = [EAGER, *(o.implementation for o in options)]
        if all((rkey, w) in stored for w in wanted):
            report.reused += len(wanted)
            continue
        need = budget.region_bytes(graph, cand.region)
        if memory_bytes and need > memory_bytes:
            report.over_budget.append(f"{cand.rule}@{cand.region.output} needs about {need / 2**20:.0f} MiB")
            counters["tuning.over_budget"] += 1
            continue
        try:
            new = _measure_candidate(graph, cand, options, budget_s)
        except regions.NotMeasurable as exc:
            report.unmeasurable.append(f"{cand.rule}@{cand.region.output}: {exc}")
            counters["tuning.unmeasurable"] += 1
            continue
        for region in options:
            impls[region.implementation] = paths.implementation_row(region)
        impls[EAGER] = paths.implementation_row(Region(cand.rule, EAGER, (), (), 0, ()))
        rows += [r | {"graph_key": keys[0], "workload_key": keys[1], "env_key": keys[2]} for r in new]
        for r in new:
            stored[(rkey, r["implementation_id"])] = r | {"ok": bool(r["ok"])}
    if report.over_budget and not rows and not report.reused:
        raise budget.OverBudget(
            f"{'; '.join(report.over_budget[:3])} to measure, over the tuning memory budget of "
            f"{memory_bytes / 2**20:.0f} MiB (HYPATIA_TUNE_MEMORY_MB); the plan keeps its heuristic choices")
    store.put_traces(rows, list(impls.values()))
    store.put_region_verdicts(keys[2], verdicts.from_traces(rows))  # the accuracy checks validate the shapes
    report.measured += len(rows)
    counters["traces_written"] += len(rows)
    counters["traces_reused"] += report.reused
    if device_type == "cuda":
        torch.cuda.empty_cache()
    excluded = verdicts.excluded(store, keys[2], graph, list(state.candidates), store.failed_regions(keys))
    plan = verdicts.mark_validated(store, keys[2], graph, finish(state, policy, paths.measurements(stored), excluded))
    log.info("tuned %s: %d traces measured, %d reused, %d region(s) chosen, %.2f s",
             keys[0][:16], report.measured, report.reused, len(plan.regions), time.perf_counter() - started)
    return plan
