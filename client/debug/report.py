"""The report: what the artifacts folder (``HYPATIA_ARTIFACTS``) and the daemon's store say about
every compiled graph, as one JSON document (schema ``hypatia-report/1``).

:func:`build_report` only reads; a file that is missing or unreadable becomes a line under
``notes`` instead of an error, so a report of an interrupted process still builds.
:func:`write_report` is what ``hypatia-ctl report`` runs.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_ID = "hypatia-report/1"
DEFAULT_ARTIFACTS = "hypatia-artifacts"
DEFAULT_OUT = "hypatia-report"
FORMATS = ("html", "json")

# The files every graph folder should hold; the AOT files depend on the graph's phase.
GRAPH_FILES = ("summary.json", "stats.json", "rewrites.json", "plan.json", "dynamo.py", "executed.py")
PHASE_FILES = {"training": ("aot_forward.py", "aot_backward.py"), "inference": ("aot_inference.py",)}
_GRAPH_DIR = re.compile(r"^graph-(\d+)-")
_REPRO = re.compile(r"^repro-(\d+)-.*\.py$")


class ReportError(Exception):
    """The report cannot be written (an unknown format, an output folder that cannot be made)."""


def default_artifacts_dir(config: Any = None) -> Path:
    """The configured artifacts folder (``HYPATIA_ARTIFACTS``) where it is set, else
    ``./hypatia-artifacts``."""
    return Path(getattr(config, "artifacts", None) or DEFAULT_ARTIFACTS)


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _read_json(path: Path, notes: list[str], where: str) -> Any:
    """The file's JSON, or None with a note saying it is unreadable (a missing file is the
    caller's to note: it knows whether the file was expected)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        notes.append(f"{where}: {path.name} is unreadable ({type(exc).__name__}: {exc})")
        return None


def _process_dirs(root: Path) -> list[Path]:
    """The process folders under ``root``; ``root`` itself when it is one."""
    if (root / "process.json").exists() or any(_GRAPH_DIR.match(p.name) for p in root.iterdir() if p.is_dir()):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir())


def _files(graph_dir: Path) -> list[dict[str, Any]]:
    """Every file in the graph folder (recursively), relative names, sorted."""
    out = []
    for path in sorted(graph_dir.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out.append({"name": path.relative_to(graph_dir).as_posix(), "bytes": path.stat().st_size})
    return out


def _executor_from_plan(plan: dict | None) -> dict | None:
    """A stored plan's executor decision as {"chosen", "times": {candidate: ms}}, or None."""
    decision = ((plan or {}).get("recipe") or {}).get("executor")
    if not isinstance(decision, dict) or "chosen" not in decision:
        return None
    times = {}
    for t in _items(decision.get("times")):
        if isinstance(t, dict) and "name" in t:
            times[str(t["name"])] = None if t.get("error") else round(float(t.get("median_us", 0.0)) / 1000.0, 6)
    return {"chosen": str(decision["chosen"]), "times": times, "source": "daemon"}


def _executor_from_summary(value: Any) -> dict | None:
    """summary.json's "executor": the chosen name (no times), or a decision map as the store keeps it."""
    if isinstance(value, str):
        return {"chosen": value, "times": {}, "source": "artifacts"}
    if isinstance(value, dict) and "chosen" in value:
        found = _executor_from_plan({"recipe": {"executor": value}}) or {}
        return found | {"source": "artifacts"}
    return None


def _speedup(executor: dict | None) -> float | None:
    """Eager time over the chosen executor's time, where both were measured."""
    if not executor:
        return None
    times = executor["times"]
    eager, chosen = times.get("eager"), times.get(executor["chosen"])
    if not eager or not chosen:
        return None
    return round(eager / chosen, 4)


def _kerneldiff_summary(graph_id: str, kd: dict) -> dict[str, Any]:
    """The worst tensor of one KernelDiff result: the one with the largest max_abs."""
    worst, worst_abs = None, None
    for t in _items(kd.get("tensors")):
        value = t.get("max_abs") if isinstance(t, dict) else None
        if not isinstance(value, (int, float)):
            continue
        if worst_abs is None or math.isnan(value) or (not math.isnan(worst_abs) and value > worst_abs):
            worst, worst_abs = str(t.get("name")), float(value)
            if math.isnan(value):
                break
    return {"graph": graph_id, "passed": bool(kd.get("passed")), "worst_tensor": worst, "max_abs": worst_abs}


def _graph(process_dir: Path, graph_dir: Path, plans: dict[str, dict], notes: list[str],
           repros: dict[int, list[str]]) -> dict[str, Any]:
    """One graph folder's details; missing files are listed in the graph and in ``notes``."""
    graph_id = f"{process_dir.name}/{graph_dir.name}"
    summary = _read_json(graph_dir / "summary.json", notes, graph_id)
    summary = summary if isinstance(summary, dict) else None
    expected = list(GRAPH_FILES)
    if graph_dir.name.endswith("-unplanned"):
        expected = [f for f in expected if f not in ("plan.json", "rewrites.json")]
    phase = (summary or {}).get("phase")
    expected += PHASE_FILES.get(phase, ()) if isinstance(phase, str) else ()
    missing = [f for f in expected if not (graph_dir / f).exists()]
    if missing:
        notes.append(f"{graph_id}: missing {', '.join(missing)}")
    breaks = _read_json(graph_dir / "graph_breaks.json", notes, graph_id)
    kd = _read_json(graph_dir / "kerneldiff.json", notes, graph_id)
    kd = kd if isinstance(kd, dict) else None
    if kd is not None:
        for rel in _items(kd.get("heatmaps")):
            path = (graph_dir / str(rel)).resolve()
            if not path.is_relative_to(graph_dir.resolve()):
                notes.append(f"{graph_id}: kerneldiff.json lists {rel}, outside the graph's folder (not shown)")
            elif not path.is_file():
                notes.append(f"{graph_id}: kerneldiff.json lists {rel}, which is missing")
    key = (summary or {}).get("graph_key")
    executor = _executor_from_plan(plans.get(key)) if isinstance(key, str) else None
    executor = executor or _executor_from_summary((summary or {}).get("executor"))
    match = _GRAPH_DIR.match(graph_dir.name)
    return {
        "id": graph_id,
        "process": process_dir.name,
        "name": graph_dir.name,
        "path": str(graph_dir),
        "summary": summary,
        "stats": _dict_or_none(_read_json(graph_dir / "stats.json", notes, graph_id)),
        "rewrites": _dict_or_none(_read_json(graph_dir / "rewrites.json", notes, graph_id)),
        "graph_breaks": [b for b in breaks if isinstance(b, dict)] if isinstance(breaks, list) else [],
        "kerneldiff": kd,
        "executor": None if executor is None else executor | {"speedup": _speedup(executor)},
        "files": _files(graph_dir),
        "repros": repros.get(int(match.group(1)), []) if match else [],
        "missing": missing,
    }


def _items(value: Any) -> list:
    """``value`` when it is a list (a field of an artifact file may be anything), else []."""
    return value if isinstance(value, list) else []


def _dict_or_none(value: Any) -> dict | None:
    return value if isinstance(value, dict) else None


def _process(process_dir: Path, plans: dict[str, dict], notes: list[str]) -> tuple[dict, list[dict]]:
    """One process folder: its process.json and its graphs, in compile order."""
    info = _read_json(process_dir / "process.json", notes, process_dir.name)
    if not (process_dir / "process.json").exists():
        notes.append(f"{process_dir.name}: missing process.json")
    repros: dict[int, list[str]] = {}
    repro_dir = process_dir / "repros"
    if repro_dir.is_dir():
        for path in sorted(repro_dir.iterdir()):
            m = _REPRO.match(path.name)
            if m:
                repros.setdefault(int(m.group(1)), []).append(f"repros/{path.name}")
    graph_dirs = sorted(p for p in process_dir.iterdir() if p.is_dir() and _GRAPH_DIR.match(p.name))
    graphs = [_graph(process_dir, g, plans, notes, repros) for g in graph_dirs]
    # The process's graph_breaks.json holds every break once; a graph's holds its frame's (shared
    # by the graphs of one frame), so the union of those stands in where the process file is missing.
    proc_breaks = _read_json(process_dir / "graph_breaks.json", notes, process_dir.name)
    if not isinstance(proc_breaks, list):
        proc_breaks = [b | {"graph": g["id"]} for g in graphs for b in g["graph_breaks"]]
    unique: dict[str, dict] = {}
    for b in proc_breaks:
        if isinstance(b, dict):
            unique.setdefault(json.dumps([b.get(k) for k in ("reason", "where", "compile_id", "detail")],
                                         default=str), b)
    files = [f for f in _files(process_dir) if not _GRAPH_DIR.match(f["name"].split("/")[0])]
    record = {"name": process_dir.name, "path": str(process_dir), "info": _dict_or_none(info),
              "graph_breaks": list(unique.values()), "graphs": len(graphs), "files": files}
    return record, graphs


def _summary(processes: list[dict], graphs: list[dict]) -> dict[str, Any]:
    """The counts the report opens with, over every process and graph."""
    fallbacks: Counter[str] = Counter()
    rules: Counter[str] = Counter()
    verdicts = {"passed": 0, "failed": 0}
    violations, executors, kerneldiff = [], [], []
    for g in graphs:
        s = g["summary"] or {}
        for f in _items(s.get("fallbacks")):
            fallbacks[str(f.get("reason") if isinstance(f, dict) else f)] += 1
        for r in _items(s.get("regions")):
            if isinstance(r, dict) and "rule" in r:
                rules[str(r["rule"])] += 1
        for v in _items(s.get("verdicts")):
            if isinstance(v, dict):
                verdicts["passed" if v.get("passed") else "failed"] += 1
        for v in _items(s.get("violations")):
            if isinstance(v, dict):
                violations.append({"graph": g["id"], **{k: str(v.get(k, "")) for k in ("adapter", "kind", "node", "detail")}})
        if g["executor"] is not None:
            e = g["executor"]
            executors.append({"graph": g["id"], "chosen": e["chosen"], "times": e["times"],
                              "speedup": e["speedup"], "source": e["source"]})
        if g["kerneldiff"] is not None:
            kerneldiff.append(_kerneldiff_summary(g["id"], g["kerneldiff"]))
    breaks = sum(len(p["graph_breaks"]) for p in processes)
    return {
        "processes": len(processes),
        "graphs": len(graphs),
        "graph_breaks": breaks,
        "fallbacks": [{"reason": r, "count": n} for r, n in sorted(fallbacks.items(), key=lambda kv: (-kv[1], kv[0]))],
        "regions_per_rule": dict(sorted(rules.items())),
        "executors": executors,
        "verdicts": verdicts,
        "kerneldiff": kerneldiff,
        "constraint_violations": violations,
    }


def build_report(artifacts_dir: Path | None, store_stats: dict | None,
                 plans: dict[str, dict] | None = None, notes: list[str] | None = None) -> dict[str, Any]:
    """The report of the artifacts under ``artifacts_dir`` and the daemon's figures
    (``hypatia-ctl stats --json``; None when it could not be asked), with executor times from
    ``plans`` (graph key -> ``hypatia-ctl plans KEY --json``) where given."""
    given, notes = list(notes or ()), []
    plans = plans or {}
    processes: list[dict] = []
    graphs: list[dict] = []
    if artifacts_dir is None:
        notes.append("no artifacts folder given")
    elif not Path(artifacts_dir).is_dir():
        notes.append(f"the artifacts folder {artifacts_dir} does not exist (set HYPATIA_ARTIFACTS=DIR when "
                     "compiling to write one)")
    else:
        for pdir in _process_dirs(Path(artifacts_dir)):
            record, found = _process(pdir, plans, notes)
            processes.append(record)
            graphs += found
    notes += given  # what asking the daemon met, after what the artifacts lack
    if store_stats is None:
        notes.append("the daemon was not reachable, and its store could not be read")
    elif not store_stats.get("running"):
        held = "its figures are what the store holds" if "plans" in store_stats else "nor was its store readable"
        notes.append(f"the daemon was not reachable (hypatiad is not running); {held}")
    return _finite({
        "schema": SCHEMA_ID,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "artifacts": None if artifacts_dir is None else str(Path(artifacts_dir).resolve()),
        "summary": _summary(processes, graphs),
        "processes": processes,
        "graphs": graphs,
        "daemon": store_stats,
        "notes": notes,
    })


def graph_keys(artifacts_dir: Path) -> list[str]:
    """The graph keys named by the summary.json files under ``artifacts_dir``."""
    keys: set[str] = set()
    root = Path(artifacts_dir)
    if not root.is_dir():
        return []
    for pdir in _process_dirs(root):
        for summary in pdir.glob("graph-*/summary.json"):
            try:
                key = json.loads(summary.read_text()).get("graph_key")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(key, str) and key:
                keys.add(key)
    return sorted(keys)


def daemon_figures(config: Any, keys: list[str]) -> tuple[dict | None, dict[str, dict], list[str]]:
    """The daemon's stats (the store's when it is down) with the stored plans listed
    (``stored_plans``), the stored plan of each graph key, and notes on what could not be read;
    never raises for an absent daemon or store."""
    from hypatia.client.rpc import DaemonUnavailable, VersionSkew
    from hypatia.daemon import control
    from hypatia.planner.store import StoreError
    from hypatia.protocol import RemoteError

    expected = (StoreError, DaemonUnavailable, VersionSkew, RemoteError, TimeoutError, OSError)
    notes: list[str] = []
    try:
        stats = control.stats(config)
    except expected as exc:
        return None, {}, [f"the daemon's figures could not be read: {exc}"]
    if stats.get("note"):
        notes.append(f"daemon: {stats['note']}")
    if not stats.get("running") and "plans" not in stats:  # neither the daemon nor its store answered
        return stats, {}, notes
    try:
        stats = stats | {"stored_plans": control.plans(config)}
    except expected as exc:
        notes.append(f"the store's plans could not be listed: {exc}")
    plans: dict[str, dict] = {}
    for key in keys:
        try:
            plans[key] = control.plan(config, key)
        except control.NoSuchPlan as exc:
            notes.append(f"no executor times from the store for graph {key[:12]}: {exc}")
        except expected as exc:
            notes.append(f"the store's plans could not be read: {exc}")
            break
    return stats, plans, notes


def write_report(config: Any, artifacts_dir: Path, out_dir: Path, fmt: str = "html") -> Path:
    """Build the report from ``artifacts_dir`` and the daemon of ``config`` and write
    ``report.json`` or ``report.html`` into ``out_dir``; returns the file's path."""
    if fmt not in FORMATS:
        raise ReportError(f"unknown report format {fmt!r}; use one of {', '.join(FORMATS)}")
    stats, plans, notes = daemon_figures(config, graph_keys(artifacts_dir))
    report = build_report(artifacts_dir, stats, plans=plans, notes=notes)
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create the output folder {out_dir}: {exc}") from None
    if fmt == "json":
        text = json.dumps(report, indent=2, sort_keys=True, allow_nan=False)
    else:
        from hypatia.debug.report_html import render_html

        text = render_html(report)
    path = Path(out_dir) / f"report.{fmt}"
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc}") from None
    return path
