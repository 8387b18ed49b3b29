"""Speedups over eager from the runtime rows: cases, geometric means by group of rows, and the
issue's targets, computed from the runtime and first-call rows (a report, never an assertion)."""

from __future__ import annotations

import math
from typing import Any

RUNTIME_BACKENDS = ("eager", "dynamo", "inductor", "inductor_ro", "hypatia_first", "hypatia")
# The groups of runtime rows each geometric mean is taken over: name -> (case field, value).
GEOMEAN_GROUPS = {"all": None, "bfloat16": ("dtype", "bfloat16"), "float32": ("dtype", "float32"),
                  "inference": ("mode", "inference"), "training": ("mode", "training")}
RO_FACTOR = 1.1  # the target: geomean(hypatia) >= 1.1 x geomean(inductor_ro)
FIRST_CALL_MODELS = ("gpt2_small", "bert_base")  # the first-call comparison
# First calls only the daemon can make warm, and the goal for them: no slower than
# Inductor with a warm local cache, and at most this factor over Dynamo alone (eager_backend).
DAEMON_WARM_CONFIGS = ("hypatia_daemon_warm", "hypatia_new_host")
EAGER_BACKEND_FACTOR = 1.2


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def runtime_cases(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(workload, dtype, mode) -> backend -> row; a skipped case's one row is under ``"-"``."""
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cases.setdefault((r["workload"], r["dtype"], r["mode"]), {})[r.get("backend", "-")] = r
    return cases


def _in_group(case: tuple, group: str) -> bool:
    where = GEOMEAN_GROUPS[group]
    return where is None or {"dtype": case[1], "mode": case[2]}[where[0]] == where[1]


def geomeans(cases: dict[tuple, dict[str, dict]]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(geometric-mean speedup over eager, number of rows it is taken over) per group of
    :data:`GEOMEAN_GROUPS` and backend; each backend over the rows it has a time for."""
    means: dict[str, dict] = {}
    counts: dict[str, dict] = {}
    for group in GEOMEAN_GROUPS:
        selected = [by for case, by in cases.items() if _in_group(case, group)]
        speedups = {b: [by[b]["speedup"] for by in selected if by.get(b, {}).get("speedup")] for b in RUNTIME_BACKENDS[1:]}
        means[group] = {b: geomean(v) for b, v in speedups.items()}
        counts[group] = {b: len(v) for b, v in speedups.items()}
    return means, counts


def _at_least_eager_and_inductor(cases: dict[tuple, dict[str, dict]]) -> dict[str, Any]:
    """Whether ``hypatia`` is at least as fast as the faster of eager and Inductor on every
    measured row; ``ratio`` is that faster time over hypatia's (below 1: slower)."""
    rows, missed = 0, []
    for (wl, dt, mode), by in cases.items():
        if "-" in by:
            continue
        rows += 1
        hyp = by.get("hypatia", {}).get("median_ms")
        best = min((t for t in (by.get(b, {}).get("median_ms") for b in ("eager", "inductor")) if t), default=None)
        if not hyp or not best:
            missed.append({"case": f"{wl}/{dt}/{mode}", "ratio": None,
                           "why": "no hypatia time" if not hyp else "no eager or inductor time"})
        elif hyp > best:
            missed.append({"case": f"{wl}/{dt}/{mode}", "ratio": round(best / hyp, 3)})
    skipped = sum(1 for by in cases.values() if "-" in by)
    return {"rows": rows, "met": rows - len(missed), "not_met": missed, "skipped_cases": skipped}


def _geomean_over_inductor_ro(cases: dict[tuple, dict[str, dict]]) -> dict[str, Any]:
    # over the rows where both have a time, so that neither mean leaves out the other's hard cases
    both = {case: by for case, by in cases.items()
            if by.get("hypatia", {}).get("speedup") and by.get("inductor_ro", {}).get("speedup")}
    g = geomeans(both)[0]["all"] if both else {"hypatia": None, "inductor_ro": None}
    ratio = g["hypatia"] / g["inductor_ro"] if g["hypatia"] and g["inductor_ro"] else None
    return {"rows": len(both), "hypatia": g["hypatia"], "inductor_ro": g["inductor_ro"],
            "ratio": round(ratio, 3) if ratio else None, "target": RO_FACTOR,
            "met": ratio is not None and ratio >= RO_FACTOR}


def _first_call(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Hypatia's default first compile against Inductor's cold compile, per model and mode."""
    times = {(r.get("workload"), r.get("config"), r.get("mode")): r.get("time_to_first_call_s") for r in rows}
    compared = {}
    for wl in FIRST_CALL_MODELS:
        for mode in ("inference", "training"):
            hyp, ind = times.get((wl, "hypatia_cold", mode)), times.get((wl, "inductor_cold", mode))
            if hyp is None and ind is None:
                continue
            compared[f"{wl}/{mode}"] = {"hypatia_cold_s": hyp, "inductor_cold_s": ind,
                                        "ratio": round(hyp / ind, 3) if hyp and ind else None,
                                        "met": bool(hyp and ind and hyp <= ind)}
    return compared


def daemon_warm_first_calls(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Each first call only the daemon made warm (``workload/mode/config``) against inductor_warm
    and eager_backend of the same workload and mode: the ratios, and whether the goal is met
    (None where a reference row is missing)."""
    times = {(r.get("workload"), r.get("config"), r.get("mode")): r.get("time_to_first_call_s") for r in rows}
    out = {}
    for (wl, config, mode), t in times.items():
        if config not in DAEMON_WARM_CONFIGS or t is None:
            continue
        warm, eager = times.get((wl, "inductor_warm", mode)), times.get((wl, "eager_backend", mode))
        out[f"{wl}/{mode}/{config}"] = {
            "time_s": t, "inductor_warm_s": warm, "eager_backend_s": eager,
            "vs_inductor_warm": round(t / warm, 3) if warm else None,
            "vs_eager_backend": round(t / eager, 3) if eager else None,
            "met": t <= warm and t <= EAGER_BACKEND_FACTOR * eager if warm and eager else None}
    return out


def targets(results: dict) -> dict[str, Any]:
    """The issue's targets, from whichever of the runtime and first-call sections ``results`` has."""
    out: dict[str, Any] = {}
    runtime = results["sections"].get("runtime")
    if runtime:
        cases = runtime_cases(runtime["rows"])
        out["hypatia_at_least_max_eager_inductor"] = _at_least_eager_and_inductor(cases)
        out["hypatia_geomean_vs_inductor_ro"] = _geomean_over_inductor_ro(cases)
    first = results["sections"].get("first_call")
    if first:
        out["first_call_hypatia_cold_vs_inductor_cold"] = _first_call(first["rows"])
        out["first_call_daemon_warm"] = daemon_warm_first_calls(first["rows"])
    return out
