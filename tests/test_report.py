"""The report (`hypatia-ctl report`): built from a synthetic artifacts folder of two processes and
three graphs (one with a KernelDiff result and its heatmap, one with a graph break, one with files
missing), its JSON pinned by the schema and its summary checked value by value, the HTML
self-contained and escaped, and the command run with a real daemon and with none."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import pytest

from hypatia.debug import report_schema
from hypatia.debug.highlight import highlight
from hypatia.debug.report import build_report, write_report
from hypatia.debug.report_html import render_html

PLANTED = "<script>alert('planted')</script>"
KEY1 = "abcdef1234567890" * 4
KEY2 = "0123456789abcdef" * 4


def png_bytes(width: int, height: int, pixel) -> bytes:
    """An 8-bit RGB PNG whose pixel (x, y) is ``pixel(x, y)`` -> (r, g, b)."""
    raw = b"".join(b"\x00" + bytes(c for x in range(width) for c in pixel(x, y)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value if isinstance(value, str) else json.dumps(value))


def make_artifacts(root: Path) -> Path:
    """Two processes, three graphs: A/001 complete with KernelDiff, A/002 training with a graph
    break and a planted script in reasons, B/001 unplanned with only its summary."""
    a = root / "hosta-100-20261129-010000"
    _write(a / "process.json", {"pid": 100, "host": "hosta", "argv": ["train.py"], "started": "2026-11-29T01:00:00",
                                "torch": "2.13", "hypatia": "0.1.0", "config": {"HYPATIA_ARTIFACTS": str(root)}})
    g1 = a / "graph-001-abcdef123456"
    _write(g1 / "summary.json", {
        "index": 1, "phase": "inference", "graph_key": KEY1, "workload_key": "w1", "env_key": "e1", "model": "Block",
        "from_daemon": True, "executor": "inductor",
        "regions": [{"rule": "rms_norm", "kernel": "k.rms", "placement": "device", "nodes": ["a", "b"], "output": 3},
                    {"rule": "rms_norm", "kernel": "k.rms", "placement": "device", "nodes": ["c"], "output": 7},
                    {"rule": "linear_silu", "kernel": "k.ls", "placement": "device", "nodes": ["d"], "output": 9}],
        "fallbacks": [],
        "verdicts": [{"rule": "rms_norm", "kernel": "k.rms", "passed": True, "detail": "ok"},
                     {"rule": "rms_norm", "kernel": "k.rms", "passed": True, "detail": "ok"},
                     {"rule": "linear_silu", "kernel": "k.ls", "passed": False, "detail": "max abs 0.5"}],
        "violations": [{"adapter": "mock", "kind": "dtype", "node": "mul_3", "detail": "float64 not supported"}]})
    _write(g1 / "stats.json", {"nodes": 12, "ops": {"aten.mm": 2}, "dtypes": {"float32": 12},
                               "parameter_bytes": 4096, "activation_bytes": 1024, "inputs": 3})
    _write(g1 / "rewrites.json", {"fired": [{"rule": "rms_norm", "kernel": "k.rms", "nodes": ["a", "b"]}],
                                  "rejected": [{"rule": "attention", "reason": "mask of unknown shape"}], "matched": []})
    _write(g1 / "plan.json", json.dumps({"graph_key": KEY1, "regions": []}, indent=2))
    for name in ("dynamo.py", "aot_inference.py", "executed.py"):
        _write(g1 / name, "def forward(self, x):\n    # the graph\n    return (x * 2, 'text')\n")
    _write(g1 / "inductor" / "output_code.py", "import torch\nclass Runner:\n    pass\n")
    _write(g1 / "kernels" / "rms.cu", '__global__ void rms(float* x) { /* c */ x[0] = 1.0f; }  // "done"\n')
    heat = png_bytes(8, 4, lambda x, y: (255, 32 * x, 0))
    (g1 / "heatmaps").mkdir()
    (g1 / "heatmaps" / "out0.png").write_bytes(heat)
    _write(g1 / "kerneldiff.json", {
        "reference": "eager", "atol": 1e-5, "rtol": 1e-4, "allowed_share": 0.0, "repeats": 2, "passed": False,
        "tensors": [{"name": "out[0]", "shape": [4, 8], "dtype": "float32", "max_abs": 0.5, "mean_abs": 0.1,
                     "max_rel": 0.9, "mean_rel": 0.2, "rmse": 0.2, "share_past_tol": 0.25, "nan": 0, "inf": 0,
                     "ref_nan": 0, "ref_inf": 0, "worst": [[1, 2]], "passed": False, "noise_max_abs": 0.0},
                    {"name": "grad.w", "shape": [8], "dtype": "float32", "max_abs": 0.01, "mean_abs": 0.001,
                     "max_rel": 0.01, "mean_rel": 0.001, "rmse": 0.002, "share_past_tol": 0.0, "nan": 0, "inf": 0,
                     "ref_nan": 0, "ref_inf": 0, "worst": [[3]], "passed": True, "noise_max_abs": None}],
        "attribution": [{"region": 9, "rule": "linear_silu", "kernel": "k.ls", "max_abs_without": 0.0,
                         "explains": True}],
        "heatmaps": ["heatmaps/out0.png"]})
    g2 = a / "graph-002-0123456789ab"
    _write(g2 / "summary.json", {
        "index": 2, "phase": "training", "graph_key": KEY2, "workload_key": "w2", "env_key": "e1", "model": "Block",
        "from_daemon": False, "executor": None,
        "regions": [{"rule": "rms_norm", "kernel": "k.rms", "placement": "device", "nodes": ["x"], "output": 2}],
        "fallbacks": [{"reason": PLANTED}, {"reason": "no plan in time"}, {"reason": "no plan in time"}],
        "verdicts": [{"rule": "rms_norm", "kernel": "k.rms", "passed": True, "detail": "ok"}]})
    _write(g2 / "stats.json", {"nodes": 5, "ops": {}, "dtypes": {}, "parameter_bytes": 0, "activation_bytes": 0,
                               "inputs": 1})
    _write(g2 / "rewrites.json", {"fired": [], "rejected": [], "matched": []})
    _write(g2 / "plan.json", "{}")
    for name in ("dynamo.py", "aot_forward.py", "aot_backward.py", "executed.py"):
        _write(g2 / name, "x = 1\n")
    brk = {"reason": f"data-dependent branch {PLANTED}", "where": "model.py:12", "compile_id": "0/0", "detail": "..."}
    _write(g2 / "graph_breaks.json", [brk])  # the graph's frame's breaks; the process file has every break once
    _write(a / "graph_breaks.json", [brk, {"reason": "call to print", "where": "model.py:30", "compile_id": "1/0",
                                           "detail": "..."}])
    _write(a / "guards-001-0-0.txt", "GLOBAL_STATE guard\n")
    _write(g2 / "guards.txt", "TENSOR_MATCH x\n")
    b = root / "hostb-200-20261129-020000"  # no process.json
    g3 = b / "graph-001-unplanned"
    _write(g3 / "summary.json", {"index": 1, "phase": "inference", "graph_key": None, "workload_key": None,
                                 "env_key": None, "model": "Net", "from_daemon": False, "executor": "eager",
                                 "regions": [], "fallbacks": [{"reason": "no plan in time"}], "verdicts": []})
    _write(b / "repros" / "repro-001-crash.py", "print('repro')\n")
    return root


EXECUTOR_PLAN = {"recipe": {"executor": {"chosen": "inductor", "training": False, "times": [
    {"name": "eager", "median_us": 2000.0, "spread_us": 5.0, "samples": 10, "error": ""},
    {"name": "inductor", "median_us": 500.0, "spread_us": 3.0, "samples": 10, "error": ""},
    {"name": "cudagraphs", "median_us": 0.0, "spread_us": 0.0, "samples": 0, "error": "capture failed"}]}}}


@pytest.fixture
def artifacts(tmp_path) -> Path:
    return make_artifacts(tmp_path / "artifacts")


def test_summary_counts_every_graph_and_process(artifacts):
    report = build_report(artifacts, None, plans={KEY1: EXECUTOR_PLAN})
    report_schema.validate(report)
    s = report["summary"]
    assert (s["processes"], s["graphs"], s["graph_breaks"]) == (2, 3, 2)
    assert s["fallbacks"] == [{"reason": "no plan in time", "count": 3}, {"reason": PLANTED, "count": 1}]
    assert s["regions_per_rule"] == {"linear_silu": 1, "rms_norm": 3}
    assert s["verdicts"] == {"passed": 3, "failed": 1}
    a, b = "hosta-100-20261129-010000", "hostb-200-20261129-020000"
    assert s["executors"] == [
        {"graph": f"{a}/graph-001-abcdef123456", "chosen": "inductor", "source": "daemon", "speedup": 4.0,
         "times": {"eager": 2.0, "inductor": 0.5, "cudagraphs": None}},
        {"graph": f"{b}/graph-001-unplanned", "chosen": "eager", "source": "artifacts", "speedup": None, "times": {}}]
    assert s["kerneldiff"] == [{"graph": f"{a}/graph-001-abcdef123456", "passed": False, "worst_tensor": "out[0]",
                                "max_abs": 0.5}]
    assert s["constraint_violations"] == [{"graph": f"{a}/graph-001-abcdef123456", "adapter": "mock", "kind": "dtype",
                                           "node": "mul_3", "detail": "float64 not supported"}]
    assert report["notes"] == [
        f"{b}: missing process.json",
        f"{b}/graph-001-unplanned: missing stats.json, dynamo.py, executed.py, aot_inference.py",
        "the daemon was not reachable, and its store could not be read"]
    g1, g2, g3 = report["graphs"]
    assert [f["name"] for f in g1["files"]] == [
        "aot_inference.py", "dynamo.py", "executed.py", "heatmaps/out0.png", "inductor/output_code.py",
        "kerneldiff.json", "kernels/rms.cu", "plan.json", "rewrites.json", "stats.json", "summary.json"]
    assert g1["stats"]["nodes"] == 12 and g1["rewrites"]["rejected"][0]["reason"] == "mask of unknown shape"
    assert g2["graph_breaks"][0]["where"] == "model.py:12" and g2["missing"] == []
    pa, pb = report["processes"]
    assert [b["where"] for b in pa["graph_breaks"]] == ["model.py:12", "model.py:30"] and pb["graph_breaks"] == []
    assert [f["name"] for f in pa["files"]] == ["graph_breaks.json", "guards-001-0-0.txt", "process.json"]
    assert pa["info"]["pid"] == 100 and pb["info"] is None and (pa["graphs"], pb["graphs"]) == (2, 1)
    assert g3["repros"] == ["repros/repro-001-crash.py"] and g3["stats"] is None
    json.dumps(report, allow_nan=False)  # strict JSON


def test_executor_falls_back_to_the_summary_and_daemon_figures_are_kept(artifacts):
    report = build_report(artifacts, {"running": True, "plans": 4})
    assert report["summary"]["executors"][0] | {"times": None} == {
        "graph": "hosta-100-20261129-010000/graph-001-abcdef123456", "chosen": "inductor", "times": None,
        "speedup": None, "source": "artifacts"}
    assert report["daemon"] == {"running": True, "plans": 4}
    assert not any("daemon" in n for n in report["notes"])
    report_schema.validate(report)


def test_broken_and_absent_files_become_notes(tmp_path):
    root = make_artifacts(tmp_path / "a")
    g = root / "hosta-100-20261129-010000" / "graph-002-0123456789ab"
    (g / "stats.json").write_text("{not json")
    (g / "summary.json").unlink()
    report = build_report(root, None)
    report_schema.validate(report)
    assert any("graph-002-0123456789ab: stats.json is unreadable" in n for n in report["notes"])
    assert any(n.endswith("graph-002-0123456789ab: missing summary.json") for n in report["notes"])
    assert report["summary"]["graph_breaks"] == 2 and report["summary"]["graphs"] == 3
    (root / "hosta-100-20261129-010000" / "graph_breaks.json").unlink()  # then the graphs' files count
    assert build_report(root, None)["summary"]["graph_breaks"] == 1
    missing = build_report(tmp_path / "nowhere", None)
    report_schema.validate(missing)
    assert missing["summary"]["graphs"] == 0 and "does not exist" in missing["notes"][0]


def test_fields_of_the_wrong_type_do_not_stop_the_report(tmp_path):
    g = tmp_path / "a" / "h-1-20261129-000000" / "graph-001-unplanned"
    _write(g / "summary.json", {"phase": [3], "graph_key": {"k": 1}, "regions": "x", "fallbacks": 3, "verdicts": [1, "a", {"passed": 0}],
                                "violations": {"a": 1}, "executor": 5, "model": ["m"]})
    _write(g / "stats.json", [1, 2])
    _write(g / "kerneldiff.json", {"passed": True, "tensors": "none", "heatmaps": ["../../../etc/passwd", 7],
                                   "attribution": None})
    _write(g / "graph_breaks.json", {"reason": "not a list"})
    _write(g.parent / "process.json", {"config": ["HYPATIA_X"], "argv": "python x.py"})
    report = build_report(tmp_path / "a", None)
    report_schema.validate(report)
    s = report["summary"]
    assert (s["graphs"], s["graph_breaks"], s["fallbacks"], s["regions_per_rule"]) == (1, 0, [], {})
    assert s["verdicts"] == {"passed": 0, "failed": 1} and s["constraint_violations"] == [] and s["executors"] == []
    assert s["kerneldiff"] == [{"graph": "h-1-20261129-000000/graph-001-unplanned", "passed": True,
                                "worst_tensor": None, "max_abs": None}]
    assert report["notes"][-3:] == [
        "h-1-20261129-000000/graph-001-unplanned: kerneldiff.json lists ../../../etc/passwd, outside the graph's "
        "folder (not shown)",
        "h-1-20261129-000000/graph-001-unplanned: kerneldiff.json lists 7, which is missing",
        "the daemon was not reachable, and its store could not be read"]
    page = render_html(report)
    assert "data:image" not in page


def test_schema_rejects_a_changed_shape(artifacts):
    report = build_report(artifacts, None)
    report_schema.validate(report)
    bad = json.loads(json.dumps(report))
    bad["summary"]["verdicts"]["passed"] = "3"
    del bad["summary"]["graph_breaks"]
    bad["summary"]["extra"] = 1
    errors = sorted(report_schema.errors(bad))
    assert errors == ["$.summary.verdicts.passed: expected integer, got str", "$.summary: lacks 'graph_breaks'",
                      "$.summary: unexpected key 'extra'"]
    with pytest.raises(report_schema.SchemaViolation):
        report_schema.validate(bad)
    assert report_schema.SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_html_is_self_contained_escaped_and_shows_the_summary(artifacts):
    page = render_html(build_report(artifacts, None, plans={KEY1: EXECUTOR_PLAN}))
    assert PLANTED not in page and "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;planted&#x27;)&lt;/script&gt;" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    for value in ("rms_norm", "linear_silu", "no plan in time", "out[0]", "mul_3", "float64 not supported",
                  "model.py:12", "model.py:30", "GLOBAL_STATE guard", "hostb-200-20261129-020000/graph-001-unplanned", "mask of unknown shape"):
        assert escape_text(value) in page, value
    summary = page[page.index('<section id="summary">'):page.index("</section>")]
    assert "<td>rms_norm</td><td>3</td>" in summary and "<td>linear_silu</td><td>1</td>" in summary
    assert '<div class="card"><b>3</b>graphs</div>' in summary and '<div class="card"><b>2</b>graph breaks</div>' in summary
    # graph-001's speedup, then its times for cudagraphs (failed), eager and inductor
    assert "<td>4</td><td>-</td><td>2</td><td>0.5</td>" in summary
    assert summary.count("<svg") == 2
    assert page.count('src="data:image/png;base64,') == 1
    assert '<span class="kw">def</span>' in page and '<span class="cm"># the graph</span>' in page
    assert '<span class="kw">__global__</span>' in page and '<span class="cm">/* c */</span>' in page
    assert page.count("<details") >= 3


def escape_text(value: str) -> str:
    from html import escape

    return escape(value, quote=True)


def test_highlight_escapes_every_token():
    out = highlight('if x < 1:  # <b>\n    s = "<i>"\n', "python")
    assert out == ('<span class="kw">if</span> x &lt; <span class="nu">1</span>:  <span class="cm"># &lt;b&gt;</span>\n'
                   '    s = <span class="st">&quot;&lt;i&gt;&quot;</span>\n')
    assert highlight("<x>", "text") == "&lt;x&gt;"


def test_write_report_refuses_an_unknown_format(artifacts, tmp_path):
    from hypatia.debug.report import ReportError

    with pytest.raises(ReportError, match="unknown report format"):
        write_report(None, artifacts, tmp_path / "out", "pdf")
    assert not (tmp_path / "out").exists()


def test_ctl_report_with_no_daemon(home, artifacts, tmp_path):
    out = tmp_path / "out"
    proc = home.ctl("report", "--format", "json", "--artifacts", str(artifacts), "--out", str(out))
    path = Path(proc.stdout.strip())
    assert path == out / "report.json"
    report = json.loads(path.read_text())
    report_schema.validate(report)
    assert report["summary"]["graphs"] == 3 and report["summary"]["verdicts"] == {"passed": 3, "failed": 1}
    store = home.config.store_shown  # a fresh home: nothing has made the store yet
    assert report["daemon"] == {"running": False, "socket": home.config.endpoint, "store": {"path": store},
                                "note": f"no store at {store} yet; it is created by the first plan"}
    assert report["notes"][-2:] == [f"daemon: no store at {store} yet; it is created by the first plan",
                                    "the daemon was not reachable (hypatiad is not running); nor was its store readable"]
    assert home.daemon_pid() is None  # a report does not start the daemon
    # the default artifacts folder is HYPATIA_ARTIFACTS; the default format is html
    proc = home.ctl("report", "--out", str(out), extra_env={"HYPATIA_ARTIFACTS": str(artifacts)})
    assert Path(proc.stdout.strip()) == out / "report.html"
    page = (out / "report.html").read_text()
    assert "graph-001-abcdef123456" in page and "not running: figures read from the store" in page
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    proc = home.ctl("report", "--artifacts", str(artifacts), "--out", str(blocked), check=False)
    assert proc.returncode == 2 and f"hypatia-ctl: cannot create the output folder {blocked}" in proc.stderr


def test_ctl_report_with_a_running_daemon(daemon, tmp_path):
    """The daemon's counters, and the executor times of a plan it stores, measured by a client."""
    from hypatia.client.rpc import DaemonClient
    from test_daemon import tiny_plan_request

    request = tiny_plan_request()
    keys = {name: request[name] for name in ("graph_key", "workload_key", "env_key")}
    client = DaemonClient(daemon.config, timeout_ms=20_000, retries=0)
    try:
        plan = client.call("make_plan", request)["plan"]
        times = [{"name": "inductor", "median_us": 10.0}, {"name": "eager", "median_us": 30.0}]
        client.call("report", keys | {"pid": 1, "executor": {"revision": plan["revision"], "chosen": "inductor",
                                                              "training": False, "times": times}})
    finally:
        client.close()
    artifacts = make_artifacts(tmp_path / "artifacts")
    summary = artifacts / "hosta-100-20261129-010000" / "graph-001-abcdef123456" / "summary.json"
    summary.write_text(json.dumps(json.loads(summary.read_text()) | {"graph_key": keys["graph_key"]}))

    out = tmp_path / "out"
    proc = daemon.ctl("report", "--format", "json", "--artifacts", str(artifacts), "--out", str(out))
    report = json.loads(Path(proc.stdout.strip()).read_text())
    report_schema.validate(report)
    assert report["daemon"]["running"] is True and report["daemon"]["pid"] == daemon.daemon_pid()
    assert report["daemon"]["plans"] == 1 and report["daemon"]["executors"]["choices"] == 1
    assert [r["graph_key"] for r in report["daemon"]["stored_plans"]] == [keys["graph_key"]]
    page = render_html(report)
    assert f"<td>{keys['graph_key']}</td>" in page and f"pid {daemon.daemon_pid()}" in page
    assert not any("not reachable" in n for n in report["notes"])
    assert report["summary"]["executors"][0] == {
        "graph": "hosta-100-20261129-010000/graph-001-abcdef123456", "chosen": "inductor", "source": "daemon",
        "times": {"inductor": 0.01, "eager": 0.03}, "speedup": 3.0}
    # a graph key the store does not hold: the report says so and keeps what the artifacts say
    assert any(f"no executor times from the store for graph {KEY2[:12]}" in n for n in report["notes"])
    assert report["summary"]["regions_per_rule"] == {"linear_silu": 1, "rms_norm": 3}
