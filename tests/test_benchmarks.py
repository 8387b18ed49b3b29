"""The benchmark runner works end to end (`--quick`); no timing is asserted, only that every
section produced real rows, compiled outputs are accurate, and the report files exist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_quick_run_produces_report_json_and_chart(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=580,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    sections = results["sections"]
    assert set(sections) == {"daemon", "runtime", "first_call", "multiprocess"}
    for name, section in sections.items():
        assert section["rows"], f"section {name} has no rows: {section.get('notes')}"

    runtime = [r for r in sections["runtime"]["rows"] if "backend" in r]
    assert {r["backend"] for r in runtime} == {"eager", "inductor", "hypatia"}
    for r in runtime:
        assert "error" not in r, r
        assert r["median_ms"] > 0 and r["repeats"] >= 5
        assert r["rel_error"] < 1e-4, r  # float32 against the float64 reference
    assert all(r["speedup"] == 1.0 for r in runtime if r["backend"] == "eager")

    figures = {r["figure"]: r for r in sections["daemon"]["rows"]}
    assert figures["plan_hit_round_trip"]["p50_us"] > 0
    assert figures["per_call_overhead"]["hypatia_us"] > 0

    warm = [r for r in sections["first_call"]["rows"] if r.get("config") == "hypatia_warm_daemon"]
    assert warm and all(r["hypatia_counters"]["daemon_hits"] > 0 for r in warm), warm

    multi = [r for r in sections["multiprocess"]["rows"] if r.get("processes", 0) > 1]
    assert multi and all(r["planned_per_graph"] == 1.0 for r in multi), multi

    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "results.md").read_text()
    assert "## Runtime" in text and "Geometric-mean speedup" in text and "## Time to first call" in text
    assert "## Runtime" in proc.stdout
