"""Results -> a markdown report, a JSON file and a PNG chart of speedups over eager."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.speedups import (DAEMON_WARM_CONFIGS, EAGER_BACKEND_FACTOR, FIRST_CALL_MODELS, RUNTIME_BACKENDS,
                                 daemon_warm_first_calls, geomean, geomeans, runtime_cases, targets)


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


def _backend_cell(backend: str, r: dict) -> str:
    if "error" in r:
        return "error: " + r["error"][:60]
    if backend == "eager":
        return f"{_fmt(r.get('median_ms'))} ±{_fmt(r.get('spread_pct'), 2)}%"
    return f"{_fmt(r.get('median_ms'))} ({_fmt(r.get('speedup'))}x)"


def _executors(r: dict) -> str:
    return ", ".join(name + (f" x{n}" if n > 1 else "") for name, n in r.get("executors", {}).items()) or "-"


def _measured(r: dict) -> str:
    """The warm-up sessions' executor measurements, as 'name us' per candidate (last session)."""
    choices = r.get("warmup_choices") or []
    if not choices:
        return "-"
    last = max(c["session"] for c in choices)
    parts = []
    for c in (c for c in choices if c["session"] == last):
        times = [f"{name} {_fmt(m['median_us'])}" if not m.get("error") else f"{name} error"
                 for name, m in c.items() if isinstance(m, dict)]
        parts.append("; ".join(times))
    return " / ".join(parts)


def runtime_section(section: dict) -> tuple[str, dict]:
    cases = runtime_cases(section["rows"])
    table, errors, details, choices = [], [], [], []
    for (wl, dt, mode), by in cases.items():
        if "-" in by and "skipped" in by["-"]:
            table.append([wl, dt, mode, by["-"]["skipped"]] + [""] * (len(RUNTIME_BACKENDS) - 1))
            continue
        table.append([wl, dt, mode] + [_backend_cell(b, by.get(b, {})) for b in RUNTIME_BACKENDS])
        errors.append([wl, dt, mode] + [_fmt(by.get(b, {}).get("rel_error")) for b in RUNTIME_BACKENDS[2:]])
        hyp = by.get("hypatia", {})
        if "median_ms" in hyp:
            details.append([wl, dt, mode, _executors(hyp), "yes" if hyp.get("served_from_daemon") else "NO",
                            f"{hyp.get('plans_tuned')} / {hyp.get('graphs')}",
                            hyp.get("hypatia_counters", {}).get("fallbacks", 0), hyp.get("warmup_sessions"),
                            hyp.get("warmup_s"), _executors(by.get("hypatia_first", {})), _measured(hyp)])
        for d in hyp.get("decisions_changed", []):
            choices.append([wl, dt, mode, d["phase"], d["rule"], d["heuristic"], _fmt(d["heuristic_cost_us"]),
                            d["chosen"], _fmt(d["cost_us"]),
                            _fmt(d["heuristic_cost_us"] - d["cost_us"]) if d["heuristic_cost_us"] else "-"])
    means, counts = geomeans(cases)
    summary = {"geomean_speedup": means, "geomean_rows": counts}
    text = _table(["workload", "dtype", "mode"] + [f"{b} ms " + ("(spread)" if b == "eager" else "(speedup)")
                                                   for b in RUNTIME_BACKENDS], table)
    geo_rows = []
    for group, by in means.items():
        n = max(counts[group].values(), default=0)
        geo_rows.append([group, n] + [f"{_fmt(by[b])}x" + (f" ({counts[group][b]} rows)" if counts[group][b] != n else "")
                                      if by[b] else "-" for b in RUNTIME_BACKENDS[1:]])
    text += "\n\nGeometric-mean speedup over eager (each backend over the rows it has a time for):\n" + _table(
        ["rows", "n"] + list(RUNTIME_BACKENDS[1:]), geo_rows)
    text += "\n\nRelative error against the float64 eager reference:\n" + _table(
        ["workload", "dtype", "mode"] + list(RUNTIME_BACKENDS[2:]), errors)
    if details:
        text += ("\n\nHypatia as a user gets it (a later session once the daemon holds the tuned plan and the "
                 "executor decision; measured: the last warm-up session's executor times, us):\n") + _table(
            ["workload", "dtype", "mode", "executors", "served from daemon", "plans tuned / graphs", "fallbacks",
             "warm-up sessions", "warm-up s", "hypatia_first runs", "measured"], details)
    if choices:
        text += "\n\nWhere the tuner chose differently from the heuristic (us; gain = heuristic - tuned):\n" + _table(
            ["workload", "dtype", "mode", "phase", "rule", "heuristic", "us", "tuned", "us", "gain us"], choices)
    return text, summary


def targets_text(t: dict[str, Any]) -> str:
    lines = []
    rows = t.get("hypatia_at_least_max_eager_inductor")
    if rows:
        missed = ", ".join(f"{m['case']} ({m['ratio']}x)" if m["ratio"] else f"{m['case']} ({m['why']})"
                           for m in rows["not_met"])
        skipped = f" ({rows['skipped_cases']} cases skipped)" if rows.get("skipped_cases") else ""
        lines.append(f"- hypatia >= max(eager, inductor) on every workload row: {rows['met']} of {rows['rows']} rows"
                     + skipped + (f"; not on {missed} (ratio: the faster of eager and inductor over hypatia)"
                                  if missed else ""))
    ro = t.get("hypatia_geomean_vs_inductor_ro")
    if ro:
        lines.append(f"- geomean(hypatia) >= {ro['target']} x geomean(inductor_ro) over the {ro['rows']} rows both ran: "
                     f"{_fmt(ro['hypatia'])}x against {_fmt(ro['inductor_ro'])}x, ratio {_fmt(ro['ratio'])}: "
                     + ("met" if ro["met"] else "NOT met"))
    first = t.get("first_call_hypatia_cold_vs_inductor_cold")
    if first is not None:
        if first:
            lines.append("- first call, Hypatia's default first compile (hypatia_cold) <= Inductor cold: " + ", ".join(
                f"{case} {_fmt(v['hypatia_cold_s'])} s vs {_fmt(v['inductor_cold_s'])} s "
                f"({'met' if v['met'] else 'NOT met'}{', ratio ' + _fmt(v['ratio']) if v['ratio'] else ''})"
                for case, v in first.items()))
        else:
            lines.append("- first call on " + " and ".join(FIRST_CALL_MODELS) + ": not measured in this run")
    shared = t.get("first_call_daemon_warm")
    if shared:
        lines.append(f"- first call made warm only by the daemon ({', '.join(DAEMON_WARM_CONFIGS)}) <= inductor_warm "
                     f"and <= {EAGER_BACKEND_FACTOR} x eager_backend: " + ", ".join(
                         f"{case} {_fmt(v['time_s'])} s, {_ratio(v['vs_inductor_warm'], 'inductor_warm')}, "
                         f"{_ratio(v['vs_eager_backend'], 'eager_backend')} ({_goal(v['met'])})"
                         for case, v in shared.items()))
    return "\n".join(lines) or "- nothing measured that the targets need"


def _ratio(value: float | None, of: str) -> str:
    return f"{_fmt(value)}x {of}" if value is not None else f"no {of} row"


def _goal(met: bool | None) -> str:
    return "not judged" if met is None else "met" if met else "NOT met"


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


def _first_call_note(r: dict) -> str:
    note = r.get("skipped") or r.get("error", "")[:80]
    if note:
        return note
    parts = []
    if r.get("hypatia_counters"):
        c = r["hypatia_counters"]
        parts.append(f"daemon hits {c.get('daemon_hits', 0)}, misses {c.get('daemon_misses', 0)}, "
                     f"local {c.get('local_plans', 0)}, plans tuned {r.get('plans_tuned', '-')}")
    if r.get("artifacts"):
        a = r["artifacts"]
        parts.append(f"artifacts compiled {a['artifacts_compiled']}, loaded {a['artifacts_loaded']}, "
                     f"warm starts {a['warm_starts']}")
    if r.get("cache_counters") and r.get("config") not in ("inductor_cold", "inductor_ro_cold", "hypatia_cold"):
        c = r["cache_counters"]
        parts.append(f"Inductor cache hits {c.get('fxgraph_cache_hit', 0) + c.get('autograd_cache_hit', 0)}")
    if r.get("vs_cold") is not None:
        parts.append(f"{r['vs_cold']}x of cold")
    return "; ".join(parts)


def first_call_section(section: dict) -> tuple[str, dict]:
    rows = []
    ttfc: dict[tuple[str, str, str], float] = {}
    for r in section["rows"]:
        rows.append([r.get("workload"), r.get("dtype"), r.get("config"), r.get("mode"), r.get("time_to_first_call_s"),
                     r.get("total_process_s"), _first_call_note(r)])
        if r.get("time_to_first_call_s") is not None:
            ttfc[(r.get("workload"), r.get("config"), r.get("mode"))] = r["time_to_first_call_s"]
    ratios: dict[str, dict[str, float]] = {}
    for (wl, config, mode), t in ttfc.items():
        for mine, theirs in (("hypatia_cold", "inductor_cold"), ("hypatia_warm", "inductor_warm")):
            other = ttfc.get((wl, theirs, mode))
            if config == mine and other:
                ratios.setdefault(f"{wl}/{mode}", {})[f"{mine}_over_{theirs}"] = round(t / other, 3)
    text = _table(["workload", "dtype", "config", "mode", "time to first call s", "process total s", "notes"], rows)
    if ratios:
        text += "\n\nHypatia's first call over Inductor's (below 1: Hypatia first):\n" + _table(
            ["workload/mode", "hypatia cold / inductor cold", "hypatia warm / inductor warm"],
            [[case, _fmt(v.get("hypatia_cold_over_inductor_cold")), _fmt(v.get("hypatia_warm_over_inductor_warm"))]
             for case, v in ratios.items()])
    shared = daemon_warm_first_calls(section["rows"])
    if shared:
        text += ("\n\nFirst calls only the daemon made warm (empty Inductor cache), against Inductor's warm cache and "
                 f"Dynamo alone (goal: <= 1 and <= {EAGER_BACKEND_FACTOR}):\n")
        text += _daemon_warm_table(section["rows"], shared)
    return text, {"first_call_ratios": ratios}  # the daemon-warm rows are judged among the targets


def _daemon_warm_table(rows: list[dict], shared: dict[str, dict]) -> str:
    by_case = {f"{r.get('workload')}/{r.get('mode')}/{r.get('config')}": r for r in rows}
    table = []
    for case, v in shared.items():
        r = by_case[case]
        a, c, d = r.get("artifacts"), r.get("inductor_cache") or {}, r.get("daemon_artifacts")
        table.append([case, v["time_s"], v["vs_inductor_warm"], v["vs_eager_backend"], _goal(v["met"]),
                      f"{a['artifacts_loaded']} / {a['warm_starts']}" if a else "not counted",
                      f"{c.get('fxgraph_cache_hit', 0)} / {c.get('autograd_cache_hit', 0)}",
                      f"{d.get('hits', 0)} / {d.get('misses', 0)}" if d else "not kept"])
    return _table(["workload/mode/config", "time s", "/ inductor_warm", "/ eager_backend", "goal",
                   "artifacts loaded / warm starts", "FX graph / AOTAutograd cache hits",
                   "daemon artifact hits / misses"], table)


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


def _shared_compiles(r: dict) -> str:
    """A Hypatia group's summed artifacts_loaded / waited / took_over."""
    a = r.get("artifacts")
    if not a:
        return "not counted" if "artifacts" in r else "-"
    return f"{a['artifacts_loaded']} / {a['artifacts_waited']} / {a['artifacts_took_over']}"


def multiprocess_section(section: dict) -> tuple[str, dict]:
    rows, compiles = [], {}
    for r in section["rows"]:
        backend = r.get("backend", "hypatia")  # results from before the Inductor rows have only Hypatia's
        rows.append([backend, r.get("processes"), r.get("workload"), r.get("wall_s"), r.get("wall_vs_one"),
                     r.get("compiles_per_graph"), r.get("artifacts_compiled_per_graph"), _shared_compiles(r),
                     r.get("plans_made"), r.get("graphs"), r.get("planned_per_graph"), r.get("coalesced"),
                     r.get("skipped") or r.get("error", "")[:80]])
        if r.get("compiles_per_graph") is not None:
            compiles.setdefault(backend, {})[str(r["processes"])] = r["compiles_per_graph"]
    text = _table(["backend", "processes", "workload", "wall s", "vs 1 process", "compiles per graph (Inductor misses)",
                   "artifacts compiled per graph", "artifacts loaded / waited / took over", "plans made", "graphs",
                   "planned per graph", "coalesced", "notes"], rows)
    return text, {"multiprocess_compiles_per_graph": compiles}


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
    "multiprocess": ("Many processes, one cold daemon (and plain Inductor)", multiprocess_section),
}


def markdown(results: dict) -> str:
    meta = results["meta"]
    out = [f"# Hypatia benchmarks — {meta['device_name']} — {meta['date']}", "",
           f"torch {meta['torch']}, hypatia {meta['hypatia']}, {meta['cpu']} ({meta['cpu_count']} cores)"
           + (", quick run" if meta.get("quick") else ""), ""]
    if meta.get("merged_from"):
        out += ["Merged from " + "; ".join(f"{m['file']} ({', '.join(m['sections'])}, {m['date']})"
                                            for m in meta["merged_from"]), ""]
    results["summary"] = {"targets": targets(results)}
    if any(k in results["sections"] for k in ("runtime", "first_call")):
        out += ["## Targets (issue 12; computed, not asserted)", "", targets_text(results["summary"]["targets"]), ""]
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
    fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(cases) + 2), 4.5))
    shown = RUNTIME_BACKENDS[2:]
    width = 0.8 / len(shown)
    for i, backend in enumerate(shown):
        vals = [v.get(backend, {}).get("speedup") or 0 for _, v in cases]
        ax.bar([x + (i - (len(shown) - 1) / 2) * width for x in range(len(cases))], vals, width, label=backend)
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
