"""Results -> a markdown report, a JSON file and a PNG chart of speedups over eager."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _backend_cell(backend: str, r: dict) -> str:
    if "error" in r:
        return "error: " + r["error"][:60]
    if backend == "eager":
        return f"{_fmt(r.get('median_ms'))} ±{_fmt(r.get('spread_pct'), 2)}%"
    return f"{_fmt(r.get('median_ms'))} ({_fmt(r.get('speedup'))}x)"


def runtime_cases(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cases.setdefault((r["workload"], r["dtype"], r["mode"]), {})[r.get("backend", "-")] = r
    return cases


def runtime_section(section: dict) -> tuple[str, dict]:
    cases = runtime_cases(section["rows"])
    table, choices = [], []
    backends = ("eager", "dynamo", "inductor", "hypatia", "hypatia_tuned")
    speedups: dict[str, list[float]] = {b: [] for b in backends[1:]}
    below: dict[str, list[str]] = {"hypatia": [], "hypatia_tuned": []}
    for (wl, dt, mode), by in cases.items():
        if "-" in by and "skipped" in by["-"]:
            table.append([wl, dt, mode, by["-"]["skipped"], "", "", "", "", "", "", "", ""])
            continue
        cells = [wl, dt, mode]
        for backend in backends:
            r = by.get(backend, {})
            cells.append(_backend_cell(backend, r))
            if backend != "eager" and r.get("speedup"):  # rows with an error carry no speedup
                speedups[backend].append(r["speedup"])
                # the tuned plan must be at most eager x 1.02
                if backend in below and r["speedup"] < 1 / 1.02:
                    below[backend].append(f"{wl}/{dt}/{mode} {r['speedup']:.3f}x")
        cells += [_fmt(by.get(b, {}).get("rel_error")) for b in backends[2:]]
        table.append(cells)
        heuristic, tuned = by.get("hypatia", {}), by.get("hypatia_tuned", {})
        for d in tuned.get("decisions_changed", []):
            choices.append([wl, dt, mode, d["phase"], d["rule"], d["heuristic"], _fmt(d["heuristic_cost_us"]),
                            d["chosen"], _fmt(d["cost_us"]),
                            _fmt(d["heuristic_cost_us"] - d["cost_us"]) if d["heuristic_cost_us"] else "-"])
        if tuned.get("median_ms") and heuristic.get("median_ms"):
            choices.append([wl, dt, mode, "whole step", "", "heuristic plan", _fmt(heuristic["median_ms"] * 1e3),
                            "tuned plan", _fmt(tuned["median_ms"] * 1e3), _fmt((heuristic["median_ms"] - tuned["median_ms"]) * 1e3)])
    summary = {
        "geomean_speedup": {b: geomean(v) for b, v in speedups.items()},
        "hypatia_below_1/1.02_of_eager": below["hypatia"],
        "tuned_below_1/1.02_of_eager": below["hypatia_tuned"],
    }
    text = _table(
        ["workload", "dtype", "mode", "eager ms (spread)", "dynamo ms (speedup)", "inductor ms (speedup)",
         "hypatia ms (speedup)", "tuned ms (speedup)", "inductor rel err", "hypatia rel err", "tuned rel err"],
        table,
    )
    text += "\n\nGeometric-mean speedup over eager: " + ", ".join(
        f"{b} {_fmt(g)}x" for b, g in summary["geomean_speedup"].items()
    )
    text += "\nHeuristic plan slower than eager x 1.02: " + (", ".join(below["hypatia"]) or "none")
    text += "\nTuned plan slower than eager x 1.02: " + (", ".join(below["hypatia_tuned"]) or "none")
    if choices:
        text += "\n\nWhere the tuner chose differently from the heuristic (us; gain = heuristic - tuned):\n" + _table(
            ["workload", "dtype", "mode", "phase", "rule", "heuristic", "us", "tuned", "us", "gain us"], choices)
    return text, summary


def families_section(section: dict) -> tuple[str, dict]:
    cases: dict[tuple, dict[str, dict]] = {}
    for r in section["rows"]:
        cases.setdefault((r["family"], r["dtype"]), {})[r.get("backend", "-")] = r
    table = []
    speedups: dict[str, list[float]] = {"eager": [], "inductor": []}
    not_fired = []
    for (family, dt), by in cases.items():
        if "-" in by and "skipped" in by["-"]:
            table.append([family, dt, by["-"]["skipped"], "", "", "", "", ""])
            continue
        cells = [family, dt] + [_backend_cell(b, by.get(b, {})) for b in ("eager", "inductor", "hypatia")]
        hyp = by.get("hypatia", {})
        if hyp.get("speedup"):
            speedups["eager"].append(hyp["speedup"])
        if hyp.get("speedup_vs_inductor"):
            speedups["inductor"].append(hyp["speedup_vs_inductor"])
        fired = hyp.get("rules_fired")
        if fired is not None and not fired.get(hyp.get("rule")):
            not_fired.append(f"{family}/{dt} ({hyp.get('rule')})")
        rules = ", ".join(f"{k} {v}" for k, v in (fired or {}).items()) or "-"
        failed = hyp.get("hypatia_counters", {}).get("regions_failed_validation")
        if failed:
            rules += f" ({failed} failed validation, ran unfused)"
        cells += [_fmt(hyp.get("speedup_vs_inductor")), _fmt(hyp.get("rel_error")), rules]
        table.append(cells)
    summary = {
        "families_geomean_hypatia_speedup": {f"over_{b}": geomean(v) for b, v in speedups.items()},
        "families_rule_not_fired": not_fired,
    }
    text = _table(
        ["family", "dtype", "eager ms (spread)", "inductor ms (speedup)", "hypatia ms (speedup)", "hypatia vs inductor",
         "hypatia rel err", "rules fired"],
        table,
    )
    text += "\n\nGeometric-mean Hypatia speedup: " + ", ".join(
        f"{k.replace('_', ' ')} {_fmt(g)}x" for k, g in summary["families_geomean_hypatia_speedup"].items()
    )
    text += "\nIntended rule did not fire: " + (", ".join(not_fired) if not_fired else "none")
    return text, summary


def first_call_section(section: dict) -> tuple[str, dict]:
    rows = []
    ttfc: dict[tuple[str, str], float] = {}
    for r in section["rows"]:
        note = r.get("skipped") or r.get("error", "")[:80]
        if r.get("hypatia_counters"):
            c = r["hypatia_counters"]
            note = note or f"daemon hits {c.get('daemon_hits', 0)}, misses {c.get('daemon_misses', 0)}, local {c.get('local_plans', 0)}"
        rows.append([r.get("config"), r.get("mode"), r.get("time_to_first_call_s"), r.get("total_process_s"), note])
        if r.get("time_to_first_call_s") is not None:
            ttfc[(r.get("config"), r.get("mode"))] = r["time_to_first_call_s"]
    summary = {}
    warm, ind = ttfc.get(("hypatia_warm_daemon", "inference")), ttfc.get(("inductor_warm", "inference"))
    if warm and ind:
        summary["hypatia_warm_over_inductor_warm_inference"] = round(warm / ind, 3)
    text = _table(["config", "mode", "time to first call s", "process total s", "notes"], rows)
    if summary:
        text += f"\n\nHypatia warm daemon / Inductor warm cache (inference): {summary['hypatia_warm_over_inductor_warm_inference']}"
    return text, summary


def daemon_section(section: dict) -> tuple[str, dict]:
    parts, summary = [], {}
    for r in section["rows"]:
        fig = r["figure"]
        if fig == "plan_hit_round_trip":
            parts.append(f"Plan-hit round trip over ipc ({r['requests']} requests): p50 {r['p50_us']} us, p99 {r['p99_us']} us")
            summary["round_trip_p50_us"] = r["p50_us"]
        elif fig == "per_call_overhead":
            parts.append(
                f"Per-call time of a tiny graph on {r['device']}: eager {r['eager_us']} us, hypatia {r['hypatia_us']} us "
                f"(+{r['hypatia_overhead_us']}), inductor {r['inductor_us']} us (+{r['inductor_overhead_us']})"
            )
    canon = [[r["nodes"], r["capture_and_hash_ms"], r["daemon_rehash_ms"], r["plan_ms"], r.get("rewrite_ms")]
             for r in section["rows"] if r["figure"] == "canonicalize"]
    text = "\n".join(f"- {p}" for p in parts)
    if canon:
        text += "\n\n" + _table(["graph nodes", "capture + hash ms (client)", "re-hash ms (daemon)", "plan ms",
                                    "of which e-graph rewrite ms"], canon)
    return text, summary


def multiprocess_section(section: dict) -> tuple[str, dict]:
    rows = [
        [r.get("processes"), r.get("workload"), r.get("wall_s"), r.get("wall_vs_one"), r.get("plans_made"), r.get("graphs"),
         r.get("planned_per_graph"), r.get("coalesced"), r.get("skipped") or r.get("error", "")[:80]]
        for r in section["rows"]
    ]
    return _table(["processes", "workload", "wall s", "vs 1 process", "plans made", "graphs", "planned per graph",
                   "coalesced", "notes"], rows), {}


def clients_section(section: dict) -> tuple[str, dict]:
    rows, summary = [], {}
    for r in section["rows"]:
        d = r.get("daemon", {})
        counters = f"{d['hits']} / {d['misses']} / {d['plans_made']}" if d else "-"
        note = r.get("skipped") or r.get("error", "")[:120]
        if not note and r.get("over_default_client_timeout"):
            note = f"{r['over_default_client_timeout']} over the default client timeout"
        rows.append([r.get("kind"), r.get("clients"), r.get("requests_per_client"), r.get("p50_ms"), r.get("p99_ms"),
                     r.get("max_ms"), r.get("throughput_rps"), counters, r.get("planning_ms_p50"), note])
        if r.get("kind") == "get_plan_hit" and r.get("p50_ms") is not None and "error" not in r:
            # the largest group measured without a problem
            summary["clients_get_plan_hit"] = {k: r[k] for k in ("clients", "p50_ms", "p99_ms", "throughput_rps")}
    text = _table(["request", "clients", "per client", "p50 ms", "p99 ms", "max ms", "requests/s",
                   "daemon hits / misses / plans made", "planning p50 ms", "notes"], rows)
    return text, summary


SECTIONS = {
    "runtime": ("Runtime (median step time)", runtime_section),
    "families": ("Fusion families (median inference call time)", families_section),
    "first_call": ("Time to first call (fresh processes)", first_call_section),
    "daemon": ("Daemon figures", daemon_section),
    "clients": ("Many clients, one daemon (plan requests)", clients_section),
    "multiprocess": ("Many processes, one cold daemon", multiprocess_section),
}


def markdown(results: dict) -> str:
    meta = results["meta"]
    out = [f"# Hypatia benchmarks — {meta['device_name']} — {meta['date']}", "",
           f"torch {meta['torch']}, hypatia {meta['hypatia']}, {meta['cpu']} ({meta['cpu_count']} cores)"
           + (", quick run" if meta.get("quick") else ""), ""]
    results.setdefault("summary", {})
    for key, (title, fn) in SECTIONS.items():
        if key not in results["sections"]:
            continue
        section = results["sections"][key]
        text, summary = fn(section)
        results["summary"].update(summary)
        out += [f"## {title}", "", text, ""]
        out += [f"- note: {n}" for n in section.get("notes", [])]
        out.append("")
    return "\n".join(out)


def chart(results: dict, path: Path) -> bool:
    """Speedup over eager per workload case, grouped by backend; False if nothing to plot."""
    section = results["sections"].get("runtime")
    if not section:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(k, v) for k, v in runtime_cases(section["rows"]).items() if "eager" in v]
    if not cases:
        return False
    labels = [f"{w}\n{d}/{m[:5]}" for (w, d, m), _ in cases]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(cases) + 2), 4.5))
    width = 0.38
    for i, backend in enumerate(("inductor", "hypatia")):
        vals = [v.get(backend, {}).get("speedup") or 0 for _, v in cases]
        ax.bar([x + (i - 0.5) * width for x in range(len(cases))], vals, width, label=backend)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cases)), labels, fontsize=7, rotation=60, ha="right")
    ax.set_ylabel("speedup over eager (x)")
    ax.set_title(f"Speedup over eager — {results['meta']['device_name']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(results: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "chart": out_dir / "speedup.png"}
    paths["markdown"].write_text(text)
    if not chart(results, paths["chart"]):
        paths.pop("chart")
    paths["json"].write_text(json.dumps(results, indent=1, default=str) + "\n")
    return paths
