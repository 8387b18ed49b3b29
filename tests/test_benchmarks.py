"""The benchmark runner works end to end (`--quick`); no timing is asserted, only that every
section produced real rows, compiled outputs are accurate, the fusion families fired their
rules, and the report files exist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("linear_silu", "mlp_gelu", "attention_mask", "attention_causal_fill", "layer_norm_manual",
            "rms_norm_manual", "softmax_manual", "conv_bn_relu", "pointwise_chain")
# Families whose Hypatia row must show its rule among those fired, on the CPU in float32.
MUST_FIRE = {"mlp_gelu": "mlp_gelu", "layer_norm_manual": "layer_norm", "softmax_manual": "softmax",
             "attention_mask": "attention_add_mask", "conv_bn_relu": "conv_bn_relu"}


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
    assert set(sections) == {"daemon", "runtime", "families", "first_call", "multiprocess"}
    for name, section in sections.items():
        assert section["rows"], f"section {name} has no rows: {section.get('notes')}"

    runtime = [r for r in sections["runtime"]["rows"] if "backend" in r]
    assert {r["backend"] for r in runtime} == {"eager", "dynamo", "inductor", "hypatia", "hypatia_tuned"}
    for r in runtime:
        assert "error" not in r, r
        assert r["median_ms"] > 0 and r["repeats"] >= 5
        assert r["rel_error"] < 1e-4, r  # float32 against the float64 reference
    assert all(r["speedup"] == 1.0 for r in runtime if r["backend"] == "eager")
    assert all(isinstance(r["decisions_changed"], list) for r in runtime if r["backend"] == "hypatia_tuned")

    families = {(r["family"], r.get("backend")): r for r in sections["families"]["rows"] if r["dtype"] == "float32"}
    for family in FAMILIES:
        for backend in ("eager", "inductor", "hypatia"):
            r = families.get((family, backend))
            assert r is not None, f"no float32 {backend} row for {family}: {sections['families']['rows']}"
            assert "error" not in r, r
            assert r["median_ms"] > 0 and r["rel_error"] < 1e-4, r
        assert isinstance(families[(family, "hypatia")]["rules_fired"], dict)
    for family, rule in MUST_FIRE.items():
        assert families[(family, "hypatia")]["rules_fired"].get(rule, 0) >= 1, families[(family, "hypatia")]

    figures = {r["figure"]: r for r in sections["daemon"]["rows"]}
    assert figures["plan_hit_round_trip"]["p50_us"] > 0
    assert figures["per_call_overhead"]["hypatia_us"] > 0
    canonicalize = [r for r in sections["daemon"]["rows"] if r["figure"] == "canonicalize"]
    assert canonicalize and all(0 < r["rewrite_ms"] <= r["plan_ms"] for r in canonicalize), canonicalize

    warm = [r for r in sections["first_call"]["rows"] if r.get("config") == "hypatia_warm_daemon"]
    assert warm and all(r["hypatia_counters"]["daemon_hits"] > 0 for r in warm), warm

    multi = [r for r in sections["multiprocess"]["rows"] if r.get("processes", 0) > 1]
    assert multi and all(r["planned_per_graph"] == 1.0 for r in multi), multi

    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "results.md").read_text()
    assert "## Runtime" in text and "Geometric-mean speedup" in text and "## Time to first call" in text
    assert "## Fusion families" in text and "Tuned plan slower than eager x 1.02" in text
    assert "## Runtime" in proc.stdout
