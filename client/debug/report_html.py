"""The report as one self-contained HTML page: inline CSS, inline SVG plots, heatmaps as data:
URIs, collapsible sections (<details>), code highlighted here; no script and no network.

Everything taken from the report or the artifact files is HTML-escaped.
"""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path
from typing import Any, Iterable

from hypatia.debug.highlight import highlight

MAX_FILE_BYTES = 256 * 1024  # code shown per file; the rest is cut with a note
MAX_IMAGE_BYTES = 4 * 1024 * 1024
_PNG = b"\x89PNG\r\n\x1a\n"
_CODE_SUFFIXES = (".py", ".cu", ".cuh", ".cpp", ".h", ".json", ".txt")

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.25em;margin:28px 0 8px;border-bottom:2px solid #3b5bdb}
h3{font-size:1.05em;margin:14px 0 6px}.meta{color:#5c6370;font-size:.9em}
table{border-collapse:collapse;margin:6px 0 14px;font-size:.92em}
th,td{border:1px solid #c9cfd9;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#3b5bdb;color:#fff}tr:nth-child(even) td{background:#eef2fb}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1b7f3b;font-weight:600}.bad{color:#c92a2a;font-weight:600}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:8px 0 16px}
.card{background:#3b5bdb;color:#fff;border-radius:6px;padding:10px 16px;min-width:110px}
.card b{display:block;font-size:1.6em}
details{margin:6px 0;border:1px solid #c9cfd9;border-radius:6px;padding:4px 10px}
summary{cursor:pointer;font-weight:600}
pre{background:#f6f8fa;border:1px solid #dde2ea;padding:8px;overflow:auto;font-size:.82em;line-height:1.35}
.kw{color:#a626a4;font-weight:600}.st{color:#50a14f}.cm{color:#8a8f98;font-style:italic}.nu{color:#986801}
ul.notes li{color:#8a5a00}img.heat{min-width:240px;max-width:480px;border:1px solid #c9cfd9;margin:4px;image-rendering:pixelated}
svg text{font-family:system-ui,sans-serif;font-size:11px}
"""


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _e("-" if value is None else value)
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _items(value: Any) -> list:
    return value if isinstance(value, list) else []


def _join(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else "" if value is None else str(value)


def _verdict(passed: Any) -> str:
    return '<span class="ok">passed</span>' if passed else '<span class="bad">FAILED</span>'


def table(headers: Iterable[str], rows: Iterable[Iterable[str]], empty: str = "none") -> str:
    """An HTML table; cells are already-escaped HTML."""
    rows = list(rows)
    if not rows:
        return f"<p class=meta>{_e(empty)}</p>"
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def bar_chart(title: str, bars: list[tuple[str, float]], unit: str, mark: float | None = None) -> str:
    """A horizontal bar chart as inline SVG; ``mark`` draws a reference line (1.0 for speedups)."""
    if not bars:
        return ""
    label_w, bar_w, row_h = 380, 420, 22
    top = max(max(v for _, v in bars), mark or 0.0) or 1.0
    height = 30 + row_h * len(bars)
    parts = [f'<svg role="img" width="{label_w + bar_w + 90}" height="{height}" '
             f'viewBox="0 0 {label_w + bar_w + 90} {height}"><title>{_e(title)}</title>',
             f'<text x="0" y="16" font-weight="600">{_e(title)}</text>']
    for i, (label, value) in enumerate(bars):
        y = 26 + i * row_h
        w = max(1.0, bar_w * value / top)
        shown = label if len(label) <= 58 else "\u2026" + label[-57:]
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{_e(shown)}</text>'
                     f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row_h - 6}" fill="#3b5bdb"/>'
                     f'<text x="{label_w + w + 4:.1f}" y="{y + 14}">{_e(_num(value))} {_e(unit)}</text>')
    if mark is not None:
        x = label_w + bar_w * mark / top
        parts.append(f'<line x1="{x:.1f}" y1="22" x2="{x:.1f}" y2="{height}" stroke="#c92a2a" stroke-dasharray="4 3"/>')
    parts.append("</svg>")
    return "".join(parts)


def _summary_html(report: dict[str, Any]) -> str:
    s = report["summary"]
    v = s["verdicts"]
    cards = [("processes", s["processes"]), ("graphs", s["graphs"]), ("graph breaks", s["graph_breaks"]),
             ("fallbacks", sum(f["count"] for f in s["fallbacks"])),
             ("fused regions", sum(s["regions_per_rule"].values())),
             ("verdicts passed", v["passed"]), ("verdicts failed", v["failed"]),
             ("violations", len(s["constraint_violations"]))]
    out = ['<section id="summary"><h2>Summary</h2><div class="cards">']
    out += [f'<div class="card"><b>{_e(n)}</b>{_e(label)}</div>' for label, n in cards]
    out.append("</div><h3>Graphs</h3>")
    out.append(table(["graph", "phase", "model", "nodes", "regions", "executor", "graph breaks", "missing files"], [
        [f'<a href="#{_anchor(g["id"])}">{_e(g["id"])}</a>', _e((g["summary"] or {}).get("phase")),
         _e((g["summary"] or {}).get("model")), _num((g["stats"] or {}).get("nodes")),
         _num(len(_items((g["summary"] or {}).get("regions")))), _e((g["executor"] or {}).get("chosen")),
         _num(len(g["graph_breaks"])), _e(", ".join(g["missing"]) or "-")]
        for g in report["graphs"]], "no graphs in the artifacts"))
    out.append("<h3>Graph breaks</h3>" + table(["process", "reason", "at"], [
        [_e(p["name"]), _e(b.get("reason")), _e(b.get("where"))] for p in report["processes"] for b in p["graph_breaks"]],
        "no graph breaks"))
    out.append("<h3>Fallbacks</h3>" + table(["reason", "count"], [
        [_e(f["reason"]), f'<span class="num">{_num(f["count"])}</span>'] for f in s["fallbacks"]], "no fallbacks"))
    out.append("<h3>Fused regions per rule</h3>" + table(["rule", "regions"], [
        [_e(rule), _num(n)] for rule, n in s["regions_per_rule"].items()], "no fused regions"))
    candidates = sorted({c for e in s["executors"] for c in e["times"]})
    out.append("<h3>Executor choices</h3>" + table(
        ["graph", "chosen", "speedup vs eager"] + [f"{c} (ms)" for c in candidates], [
            [_e(e["graph"]), f"<b>{_e(e['chosen'])}</b>", _num(e["speedup"])]
            + [_num(e["times"].get(c)) for c in candidates] for e in s["executors"]], "no executor choices recorded"))
    speedups = [(e["graph"], e["speedup"]) for e in s["executors"] if isinstance(e["speedup"], (int, float))]
    times = [(f"{e['graph']} · {c}", t) for e in s["executors"] for c, t in sorted(e["times"].items())
             if isinstance(t, (int, float))]
    out.append(bar_chart("Speedup per graph (eager time / chosen executor's time)", speedups, "x", mark=1.0))
    out.append(bar_chart("Time per executor (median per call)", times, "ms"))
    out.append(f"<h3>Validation verdicts</h3><p>{_verdict(True)} {_num(v['passed'])} &nbsp; "
               f"{_verdict(False)} {_num(v['failed'])}</p>")
    out.append("<h3>KernelDiff</h3>" + table(["graph", "verdict", "worst tensor", "max abs error"], [
        [_e(k["graph"]), _verdict(k["passed"]), _e(k["worst_tensor"]), _num(k["max_abs"])] for k in s["kerneldiff"]],
        "no KernelDiff results"))
    out.append("<h3>Constraint violations</h3>" + table(["graph", "adapter", "kind", "node", "detail"], [
        [_e(c["graph"]), _e(c["adapter"]), _e(c["kind"]), _e(c["node"]), _e(c["detail"])]
        for c in s["constraint_violations"]], "no constraint violations"))
    out.append("</section>")
    return "".join(out)


def _anchor(graph_id: str) -> str:
    return "g-" + "".join(ch if ch.isalnum() else "-" for ch in graph_id)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"(unreadable: {exc})"
    text = data[:MAX_FILE_BYTES].decode("utf-8", errors="replace")
    return text + (f"\n... ({len(data) - MAX_FILE_BYTES} more bytes not shown)" if len(data) > MAX_FILE_BYTES else "")


def _inside(base: Path, rel: str) -> Path | None:
    """``base/rel`` when it stays inside ``base`` (no ../ or absolute escapes), else None."""
    try:
        path = (base / rel).resolve()
        path.relative_to(base.resolve())
    except (OSError, ValueError):
        return None
    return path


def _image(path: Path | None) -> str:
    if path is None or not path.is_file() or path.stat().st_size > MAX_IMAGE_BYTES:
        return ""
    data = path.read_bytes()
    if not data.startswith(_PNG):
        return ""
    return f'<img class="heat" alt="{_e(path.name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _kerneldiff_html(g: dict[str, Any]) -> str:
    kd = g["kerneldiff"]
    base = Path(g["path"])
    out = [f"<h3>KernelDiff against {_e(kd.get('reference'))}: {_verdict(kd.get('passed'))}</h3>"]
    out.append(table(["tensor", "shape", "dtype", "max abs", "mean abs", "max rel", "rmse", "share past tol", "nan",
                      "inf", "verdict"], [
        [_e(t.get("name")), _e(t.get("shape")), _e(t.get("dtype")), _num(t.get("max_abs")), _num(t.get("mean_abs")),
         _num(t.get("max_rel")), _num(t.get("rmse")), _num(t.get("share_past_tol")), _num(t.get("nan")),
         _num(t.get("inf")), _verdict(t.get("passed"))] for t in _items(kd.get("tensors")) if isinstance(t, dict)]))
    attribution = [a for a in _items(kd.get("attribution")) if isinstance(a, dict)]
    if attribution:
        out.append("<p>Attribution (the graph run with one region unfused):</p>" + table(
            ["region", "rule", "kernel", "max abs without it", "explains the difference"], [
                [_num(a.get("region")), _e(a.get("rule")), _e(a.get("kernel")), _num(a.get("max_abs_without")),
                 "<b>yes</b>" if a.get("explains") else "no"] for a in attribution]))
    images = "".join(_image(_inside(base, str(rel))) for rel in _items(kd.get("heatmaps")))
    if images:
        out.append(f"<div>{images}</div>")
    return "".join(out)


def _json_block(value: Any) -> str:
    return f"<pre>{highlight(json.dumps(value, indent=2, sort_keys=True, default=str), 'json')}</pre>"


def _code_files(base: Path, files: list[dict[str, Any]]) -> str:
    """Each code or text file under ``base`` as a collapsed, highlighted block."""
    out = []
    for f in files:
        name = f["name"]
        if not name.endswith(_CODE_SUFFIXES):
            continue
        lang = "json" if name.endswith(".json") else "c" if name.endswith((".cu", ".cuh", ".cpp", ".h")) else \
            "text" if name.endswith(".txt") else "python"
        path = _inside(base, name)
        text = "(outside the artifacts folder)" if path is None else _read_text(path)
        if lang == "json":
            try:  # one-line JSON (kerneldiff.json) reads better pretty
                text = json.dumps(json.loads(text), indent=2)
            except ValueError:
                pass
        out.append(f"<details><summary>{_e(name)} <span class=meta>({_num(f['bytes'])} bytes)</span></summary>"
                   f"<pre>{highlight(text, lang)}</pre></details>")
    return "".join(out)


def _process_html(p: dict[str, Any]) -> str:
    info = p["info"] or {}
    argv = info.get("argv")
    rows = [["pid", _e(info.get("pid"))], ["host", _e(info.get("host"))],
            ["command", _e(" ".join(map(str, argv)) if isinstance(argv, list) else argv)],
            ["started", _e(info.get("started"))], ["torch", _e(info.get("torch"))],
            ["hypatia", _e(info.get("hypatia"))], ["graphs", _num(p["graphs"])]]
    config = info.get("config")
    rows += [[_e(k), _e(v)] for k, v in sorted(config.items())] if isinstance(config, dict) else []
    files = [f for f in p["files"] if f["name"] != "process.json"]
    return (f"<details><summary>{_e(p['name'])}</summary>" + table(["", ""], rows)
            + _code_files(Path(p["path"]), files) + "</details>")


def _graph_html(g: dict[str, Any]) -> str:
    base = Path(g["path"])
    out = [f'<details id="{_anchor(g["id"])}"><summary>{_e(g["id"])}</summary>']
    if g["missing"]:
        out.append(f"<p class=meta>missing: {_e(', '.join(g['missing']))}</p>")
    s = g["summary"] or {}
    if s:
        out.append(table(["graph key", "workload key", "env key", "model", "phase", "from daemon", "executor"], [[
            _e(s.get("graph_key")), _e(s.get("workload_key")), _e(s.get("env_key")), _e(s.get("model")),
            _e(s.get("phase")), _e(s.get("from_daemon")), _e((g["executor"] or {}).get("chosen"))]]))
        out.append("<h3>Fused regions</h3>" + table(["rule", "kernel", "placement", "output", "nodes"], [
            [_e(r.get("rule")), _e(r.get("kernel")), _e(r.get("placement")), _e(r.get("output")),
             _e(_join(r.get("nodes")))] for r in _items(s.get("regions")) if isinstance(r, dict)],
            "no fused regions"))
        out.append("<h3>Verdicts</h3>" + table(["rule", "kernel", "verdict", "detail"], [
            [_e(v.get("rule")), _e(v.get("kernel")), _verdict(v.get("passed")), _e(v.get("detail"))]
            for v in _items(s.get("verdicts")) if isinstance(v, dict)], "no verdicts"))
    if g["stats"]:
        out.append("<details><summary>Statistics</summary>" + _json_block(g["stats"]) + "</details>")
    if g["rewrites"]:
        rw = g["rewrites"]
        out.append("<details><summary>Rewrites</summary>")
        out.append("<h3>Fired</h3>" + table(["rule", "kernel", "nodes"], [
            [_e(f.get("rule")), _e(f.get("kernel")), _e(_join(f.get("nodes")))] for f in _items(rw.get("fired"))
            if isinstance(f, dict)]))
        out.append("<h3>Rejected</h3>" + table(["rule", "stage", "reason"], [
            [_e(r.get("rule")), _e(r.get("stage")), _e(r.get("reason"))] for r in _items(rw.get("rejected"))
            if isinstance(r, dict)]))
        out.append("</details>")
    if g["kerneldiff"]:
        out.append(_kerneldiff_html(g))
    out.append("<h3>Files</h3>" + _code_files(base, g["files"]))
    for rel in g["repros"]:
        path = _inside(base.parent, rel)
        if path is not None and path.is_file():
            out.append(f"<details><summary>{_e(rel)}</summary><pre>{highlight(_read_text(path), 'python')}</pre></details>")
    out.append("</details>")
    return "".join(out)


def _daemon_html(daemon: dict[str, Any]) -> str:
    """Whether the daemon ran, the plans its store holds, and every counter (collapsed)."""
    state = (f"hypatiad {_e(daemon.get('version'))}, pid {_e(daemon.get('pid'))}" if daemon.get("running")
             else "not running: figures read from the store")
    rows = [r for r in _items(daemon.get("stored_plans")) if isinstance(r, dict)]
    plans = table(["graph key", "graph", "model", "nodes", "device", "revision", "policy", "tuned", "regions"], [
        [_e(r.get("graph_key")), _e(r.get("graph")), _e(r.get("model")), _num(r.get("nodes")), _e(r.get("device")),
         _num(r.get("revision")), _e(r.get("policy")), _e("yes" if r.get("tuned") else "no"), _e(_join(r.get("regions")))]
        for r in rows], "no stored plans")
    counters = {k: v for k, v in daemon.items() if k != "stored_plans"}
    return (f"<p>{state}; store {_e((daemon.get('store') or {}).get('path') if isinstance(daemon.get('store'), dict) else '')}"
            f"</p><h3>Stored plans</h3>{plans}<details><summary>Every counter</summary>{_json_block(counters)}</details>")


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (summary first, then each graph, collapsed)."""
    parts = ["<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
             "<title>Hypatia report</title>",
             f"<style>{CSS}</style></head><body>",
             "<h1>Hypatia report</h1>",
             f"<p class=meta>generated {_e(report.get('generated'))} from {_e(report.get('artifacts'))}</p>",
             _summary_html(report)]
    if report.get("notes"):
        parts.append("<h2>Notes</h2><ul class=notes>" + "".join(f"<li>{_e(n)}</li>" for n in report["notes"]) + "</ul>")
    parts.append("<h2>Processes</h2>" + ("".join(_process_html(p) for p in report["processes"])
                                         or "<p class=meta>none</p>"))
    parts.append("<h2>Graphs</h2>" + ("".join(_graph_html(g) for g in report["graphs"]) or "<p class=meta>none</p>"))
    daemon = report.get("daemon")
    parts.append("<h2>Daemon</h2>" + ("<p class=meta>not reachable</p>" if daemon is None else _daemon_html(daemon)))
    parts.append("</body></html>\n")
    return "".join(parts)
