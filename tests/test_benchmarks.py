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
    assert set(sections) == {"daemon", "clients", "runtime", "families", "first_call", "multiprocess"}
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

    clients = sections["clients"]["rows"]
    assert {r["kind"] for r in clients} == {"get_plan_hit", "make_plan_miss"}, clients
    assert all(r["samples"] == r["clients"] * r["requests_per_client"] for r in clients), clients
    assert all("error" not in r for r in clients if r["kind"] == "get_plan_hit"), clients

    multi = [r for r in sections["multiprocess"]["rows"] if r.get("processes", 0) > 1]
    assert multi and all(r["planned_per_graph"] == 1.0 for r in multi), multi

    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "results.md").read_text()
    assert "## Runtime" in text and "Geometric-mean speedup" in text and "## Time to first call" in text
    assert "## Fusion families" in text and "Tuned plan slower than eager x 1.02" in text
    assert "## Many clients, one daemon" in text and "## Many processes, one cold daemon" in text
    assert "## Runtime" in proc.stdout


CLIENTS_DRIVER = """
import json
from benchmarks import clients, report

sizes = clients.Sizes(counts=(2,), hit_requests=5, miss_requests=2, hit_workloads=("mlp_small",))
section = clients.measure(sizes, quick=True)
# lookups of plans nobody stored: the rows must say so, not hide it
with clients.private_daemon() as (home, env):
    stats = clients.DaemonStats(env)
    lookup = {"graph_key": "g1-" + "0" * 64, "workload_key": "w1-" + "0" * 64, "env_key": "e1-" + "0" * 64,
              "policy": clients.POLICY}
    wrong = clients.run_group(env, home, stats, [("hit", [[lookup] * 3])])
    stats.close()
print(json.dumps({"section": section, "wrong": wrong, "markdown": report.clients_section(section)[0]}))
"""


@pytest.mark.timeout(180)
def test_clients_section_counts_every_request():
    """Two client processes against one real daemon: every request is timed once and the
    daemon's counters match what was sent; a lookup that misses is reported as an error."""
    proc = subprocess.run([sys.executable, "-c", CLIENTS_DRIVER], cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {r["kind"]: r for r in result["section"]["rows"]}
    assert set(rows) == {"get_plan_hit", "make_plan_miss"}, rows
    for kind, per_client in (("get_plan_hit", 5), ("make_plan_miss", 2)):
        r = rows[kind]
        assert (r["clients"], r["requests_per_client"], r["samples"]) == (2, per_client, 2 * per_client), r
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"], r
        assert r["throughput_rps"] > 0 and r["window_s"] > 0, r
    hit_row = rows["get_plan_hit"]
    assert "error" not in hit_row and hit_row["daemon"] == hit_row["expected"], hit_row
    assert (hit_row["daemon"]["hits"], hit_row["daemon"]["misses"], hit_row["daemon"]["plans_made"]) == (10, 0, 0)
    [wrong] = result["wrong"]
    assert wrong["samples"] == 3 and (wrong["daemon"]["hits"], wrong["daemon"]["misses"]) == (0, 3), wrong
    assert "3 of 3 requests failed" in wrong["error"] and "hits 0 (expected 3)" in wrong["error"], wrong
    assert "get_plan_hit" in result["markdown"] and "10 / 0 / 0" in result["markdown"]

    miss_row = rows["make_plan_miss"]
    assert miss_row["failed"] == 0, miss_row  # two planners storing at once wait for each other
    assert "error" not in miss_row and miss_row["daemon"] == miss_row["expected"], miss_row
    miss = miss_row["daemon"]
    assert (miss["hits"], miss["misses"], miss["plans_made"], miss["graphs"], miss["coalesced"]) == (0, 4, 4, 4, 0), miss
    assert miss["clients_seen"] == 2 and miss_row["planning_ms_p50"] > 0, miss_row
