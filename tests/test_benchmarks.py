"""The benchmark runner works end to end (`--quick`); no timing is asserted, only that every
section produced real rows, compiled outputs are accurate, the fusion families fired their
rules, Hypatia's measured session was served its executors by the daemon, and the report files
exist. `--merge` combines the results of a split run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.rows import MissingRow, find

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("linear_silu", "mlp_gelu", "attention_mask", "attention_causal_fill", "layer_norm_manual",
            "rms_norm_manual", "softmax_manual", "conv_bn_relu", "pointwise_chain")
# Families whose Hypatia row must show its rule among those fired, on the CPU in float32.
MUST_FIRE = {"mlp_gelu": "mlp_gelu", "layer_norm_manual": "layer_norm", "softmax_manual": "softmax",
             "attention_mask": "attention_add_mask", "conv_bn_relu": "conv_bn_relu"}


@pytest.mark.timeout(1500)  # a guard against a hang: the run itself has no time budget
def test_quick_run_produces_report_json_and_chart(tmp_path):
    """``--quick`` has no time budget: every row it is asked for is made however slow (and busy)
    the machine is, and a row that is still missing fails here naming the row and why."""
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--progress", str(tmp_path / "rows.jsonl")],
        cwd=ROOT, capture_output=True, text=True, timeout=1480,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    sections = results["sections"]
    # every row of the sections that take long was also written as it was measured
    written = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    def same(a: list, b: list) -> bool:
        return sorted(json.dumps(r, sort_keys=True) for r in a) == sorted(json.dumps(r, sort_keys=True) for r in b)

    assert same([row for line in written if isinstance(line, list) for row in line], sections["runtime"]["rows"])
    assert same([r for r in written if isinstance(r, dict) and "config" in r], sections["first_call"]["rows"])
    assert same([r for r in written if isinstance(r, dict) and "processes" in r], sections["multiprocess"]["rows"])
    assert set(sections) == {"daemon", "clients", "runtime", "families", "first_call", "multiprocess"}
    assert results["meta"]["budget_s"] is None
    for name, section in sections.items():
        assert section["rows"], f"section {name} has no rows: {section.get('notes')}"
        skipped = [r for r in section["rows"] if "skipped" in r and r.get("config") != "inductor_redis_warm"]
        assert not skipped, f"section {name} skipped rows: {skipped}"

    backends = ("eager", "dynamo", "inductor", "inductor_ro", "hypatia_first", "hypatia")
    runtime = {(mode, b): find(results, "runtime", workload="mlp_small", dtype="float32", mode=mode, backend=b)
               for mode in ("inference", "training") for b in backends}
    assert len([r for r in sections["runtime"]["rows"] if "backend" in r]) == len(runtime)
    for r in runtime.values():
        assert "error" not in r, r
        assert r["median_ms"] > 0 and r["repeats"] >= 5
        assert r["rel_error"] < 1e-4, r  # float32 against the float64 reference
    assert all(runtime[mode, "eager"]["speedup"] == 1.0 for mode in ("inference", "training"))
    for r in (runtime[mode, "hypatia_first"] for mode in ("inference", "training")):
        assert r["executors"] == {"inductor": r["graphs"]} and r["graphs"] >= 1, r
    for r in (runtime[mode, "hypatia"] for mode in ("inference", "training")):
        # a later session: every graph built only the executor the daemon kept with its tuned plan
        counters = r["hypatia_counters"]
        assert r["graphs"] == counters.get("graphs_inference", 0) + counters.get("graphs_training", 0) >= 1, r
        assert counters.get("executor_from_daemon") == r["graphs"] and "executor_measurements" not in counters, r
        assert r["served_from_daemon"] and r["plans_tuned"] == r["graphs"], r
        assert sum(r["executors"].values()) == r["graphs"] and set(r["executors"]) <= {"inductor", "aten", "eager"}, r
        assert 1 <= r["warmup_sessions"] <= 3 and r["warmup_s"] > 0 and r["warmup_choices"], r
        assert all(h["tuned"] and h["executor"] for h in r["daemon_plans"].values()), r
        assert isinstance(r["decisions_changed"], list)
    targets = results["summary"]["targets"]
    assert targets["hypatia_at_least_max_eager_inductor"]["rows"] == 2, targets
    assert targets["hypatia_geomean_vs_inductor_ro"]["ratio"] > 0, targets
    assert set(results["summary"]["geomean_speedup"]) == {"all", "bfloat16", "float32", "inference", "training"}

    for family in FAMILIES:
        for backend in ("eager", "inductor", "hypatia"):
            r = find(results, "families", family=family, dtype="float32", backend=backend)
            assert "error" not in r, r
            assert r["median_ms"] > 0 and r["rel_error"] < 1e-4, r
        assert isinstance(find(results, "families", family=family, dtype="float32", backend="hypatia")["rules_fired"], dict)
    for family, rule in MUST_FIRE.items():
        r = find(results, "families", family=family, dtype="float32", backend="hypatia")
        assert r["rules_fired"].get(rule, 0) >= 1, r

    assert find(results, "daemon", figure="plan_hit_round_trip")["p50_us"] > 0
    assert find(results, "daemon", figure="per_call_overhead")["hypatia_us"] > 0
    canonicalize = [r for r in sections["daemon"]["rows"] if r["figure"] == "canonicalize"]
    assert canonicalize and all(0 < r["rewrite_ms"] <= r["plan_ms"] for r in canonicalize), canonicalize

    for mode in ("training",):  # --quick measures Hypatia's first calls in training alone
        cold = find(results, "first_call", workload="mlp_small", config="hypatia_cold", mode=mode)
        warm = find(results, "first_call", workload="mlp_small", config="hypatia_warm", mode=mode)
        assert "error" not in cold and "error" not in warm, (cold, warm)
        assert cold["time_to_first_call_s"] > 0 and cold["plans_from_daemon"], cold
        # the daemon served it: a plan from its cache, or a warm start from the cold process's compiled code
        served = warm["hypatia_counters"].get("daemon_hits", 0) + warm["hypatia_counters"].get("warm_starts", 0)
        assert warm["time_to_first_call_s"] > 0 and served > 0 and warm["plans_from_daemon"], warm
    for config in ("hypatia_daemon_warm", "hypatia_new_host"):  # measured in training alone with --quick
        r = find(results, "first_call", workload="mlp_small", config=config, mode="training")
        assert "error" not in r and r["time_to_first_call_s"] > 0 and r["cache_dir_was_empty"], r
        counters = r["hypatia_counters"]
        assert counters.get("daemon_hits", 0) + counters.get("warm_starts", 0) > 0 and "inductor_cache" in r, r
        if any(k.startswith("executor.inductor") for k in counters):  # the daemon's code, not a compile
            assert counters.get("artifacts_loaded", 0) >= 1 and not counters.get("artifacts_compiled"), r
    assert find(results, "first_call", workload="mlp_small", config="hypatia_new_host", mode="training")[
        "store_copied_bytes"] > 0

    clients = sections["clients"]["rows"]
    for kind in ("get_plan_hit", "make_plan_miss"):
        for n in (1, 4):
            r = find(results, "clients", kind=kind, clients=n)
            assert r["samples"] == r["clients"] * r["requests_per_client"], r
            assert kind != "get_plan_hit" or "error" not in r, r
    assert {r["kind"] for r in clients} == {"get_plan_hit", "make_plan_miss"}, clients

    multi = find(results, "multiprocess", backend="hypatia", processes=2)
    assert multi["planned_per_graph"] == 1.0, multi
    assert multi["artifacts_compiled_per_graph"] == 1.0 and multi["compiles_per_graph"] == 1.0, multi  # one compile

    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "results.md").read_text()
    assert "## Runtime" in text and "Geometric-mean speedup" in text and "## Time to first call" in text
    assert "## Targets" in text and "hypatia >= max(eager, inductor)" in text and "geomean(hypatia) >= 1.1" in text
    assert "## Fusion families" in text and "Hypatia as a user gets it" in text
    assert "## Many clients, one daemon" in text and "## Many processes, one cold daemon" in text
    assert "First calls only the daemon made warm" in text and "compiles per graph" in text
    assert "## Runtime" in proc.stdout


def test_a_missing_row_says_which_and_why():
    results = {"sections": {
        "runtime": {"rows": [{"workload": "gpt2_small", "dtype": "float32", "mode": "training", "skipped": "time budget"}],
                    "notes": []},
        "families": {"rows": [], "notes": ["section failed: RuntimeError: no compiler"]},
    }}
    with pytest.raises(MissingRow, match=r"no runtime row workload=gpt2_small, dtype=float32, mode=training, "
                                         r"backend=hypatia: the case was skipped \(time budget\)"):
        find(results, "runtime", workload="gpt2_small", dtype="float32", mode="training", backend="hypatia")
    with pytest.raises(MissingRow, match="no families row family=layer_norm_manual.*section failed: RuntimeError"):
        find(results, "families", family="layer_norm_manual", dtype="float32", backend="eager")
    with pytest.raises(MissingRow, match="the results have no first_call section"):
        find(results, "first_call", config="hypatia_cold")


def test_the_report_renders_skipped_and_failed_rows_of_every_section(tmp_path):
    """A run cut short (skipped cases, failed measurements, a failed section) still gives a
    report; nothing in it reads a field that only a measured row has."""
    sections = {
        "runtime": {"rows": [{"workload": "mlp_small", "dtype": "float32", "mode": "training", "skipped": "time budget"},
                             {"workload": "mlp_small", "dtype": "float32", "mode": "inference", "backend": "eager",
                              "error": "RuntimeError: boom"},
                             {"workload": "mlp_small", "dtype": "float32", "mode": "inference", "backend": "hypatia",
                              "error": "RuntimeError: boom"}], "notes": []},
        "families": {"rows": [{"family": "linear_silu", "rule": "linear_silu", "dtype": "float32", "skipped": "time budget"},
                              {"family": "mlp_gelu", "rule": "mlp_gelu", "dtype": "float32", "backend": "hypatia",
                               "error": "RuntimeError: boom"}], "notes": []},
        "first_call": {"rows": [{"config": "hypatia_warm", "mode": "inference", "workload": "mlp_small", "dtype": "float32",
                                 "skipped": "time budget"},
                                {"config": "hypatia_cold", "mode": "inference", "workload": "mlp_small", "dtype": "float32",
                                 "error": "ChildFailed"},
                                {"config": "hypatia_daemon_warm", "mode": "training", "workload": "mlp_small",
                                 "dtype": "float32", "error": "RuntimeError: the daemon is not running"},
                                {"config": "hypatia_new_host", "mode": "training", "workload": "mlp_small", "dtype": "float32",
                                 "time_to_first_call_s": 3.0, "artifacts": None, "daemon_artifacts": None}], "notes": []},
        "daemon": {"rows": [], "notes": ["section failed: TimeoutError: stats"]},
        "clients": {"rows": [{"kind": "make_plan_miss", "clients": 4, "skipped": "time budget"},
                             {"kind": "group", "clients": 1, "error": "RuntimeError: boom"}], "notes": []},
        "multiprocess": {"rows": [{"processes": 2, "workload": "mlp_small", "skipped": "time budget"},
                                  {"backend": "inductor", "processes": 2, "workload": "mlp_small", "error": "boom"}],
                         "notes": []},
    }
    paths = report.write(_results("AMD EPYC", sections, quick=True, budget_s=None), tmp_path)
    text = paths["markdown"].read_text()
    assert text.count("time budget") == 5 and "section failed: TimeoutError" in text
    assert "| mlp_small/training/hypatia_new_host | 3 | - | - | not judged | not counted | 0 / 0 | not kept |" in text


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


def _results(device: str, sections: dict, **meta) -> dict:
    return {"meta": {"date": "2026-11-28 12:00 UTC", "device": "cuda", "device_name": device, "torch": "2.13",
                     "cuda": "12.8", "hypatia": "0.1.0", "python": "3.12", "cpu": "cpu", "cpu_count": 16,
                     "git_commit": "abc1234", "quick": False, "budget_s": 420.0, "elapsed_s": 400.0} | meta,
            "sections": sections}


def _case(workload: str, dtype: str, mode: str, ms: dict[str, float]) -> list[dict]:
    return [{"workload": workload, "dtype": dtype, "mode": mode, "backend": b, "median_ms": t, "repeats": 10,
             "speedup": round(ms["eager"] / t, 4), "rel_error": 1e-3} for b, t in ms.items()]


def test_merge_combines_split_runs_into_one_report(tmp_path):
    """Two commands' results (runtime split by workload, first call in the second) merge into one
    report: every measured row once, a case skipped in one run replaced by the other's rows, and
    the targets computed over all of them."""
    ms = {"eager": 10.0, "dynamo": 10.5, "inductor": 5.0, "inductor_ro": 4.0, "hypatia_first": 5.0, "hypatia": 3.0}
    first = _results("NVIDIA H200", {
        "runtime": {"rows": _case("mlp_large", "bfloat16", "inference", ms)
                    + [{"workload": "gpt2_small", "dtype": "bfloat16", "mode": "inference", "skipped": "time budget"}],
                    "notes": ["runtime note"], "elapsed_s": 300.0},
        "daemon": {"rows": [{"figure": "plan_hit_round_trip", "requests": 10, "p50_us": 50.0, "p99_us": 90.0}],
                   "notes": [], "elapsed_s": 5.0},
    })
    second = _results("NVIDIA H200", {
        "runtime": {"rows": _case("gpt2_small", "bfloat16", "inference", ms | {"hypatia": 6.0}),
                    "notes": ["runtime note"], "elapsed_s": 350.0},
        "first_call": {"rows": [
            {"workload": "gpt2_small", "dtype": "bfloat16", "config": c, "mode": "inference", "time_to_first_call_s": t}
            for c, t in (("inductor_cold", 20.0), ("hypatia_cold", 25.0))], "notes": [], "elapsed_s": 60.0},
    }, git_commit="def5678")
    paths = []
    for name, results in (("a.json", first), ("b.json", second)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(results))
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--merge", *map(str, paths), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((out / "results.json").read_text())
    assert [m["file"] for m in merged["meta"]["merged_from"]] == [str(p) for p in paths]
    assert merged["meta"]["elapsed_s"] == 800.0 and "different commits" in merged["meta"]["note"]
    assert set(merged["sections"]) == {"runtime", "daemon", "first_call"}
    runtime = merged["sections"]["runtime"]
    assert sorted((r["workload"], r.get("backend")) for r in runtime["rows"]) == sorted(
        (w, b) for w in ("mlp_large", "gpt2_small") for b in ms), runtime["rows"]  # the skipped case is gone
    assert runtime["notes"] == ["runtime note"] and runtime["elapsed_s"] == 650.0
    targets = merged["summary"]["targets"]
    assert targets["hypatia_at_least_max_eager_inductor"] == {
        "rows": 2, "met": 1, "not_met": [{"case": "gpt2_small/bfloat16/inference", "ratio": 0.833}], "skipped_cases": 0}
    assert targets["hypatia_geomean_vs_inductor_ro"]["rows"] == 2
    assert targets["first_call_hypatia_cold_vs_inductor_cold"]["gpt2_small/inference"] == {
        "hypatia_cold_s": 25.0, "inductor_cold_s": 20.0, "ratio": 1.25, "met": False}
    text = (out / "results.md").read_text()
    assert "Merged from" in text and "gpt2_small/bfloat16/inference (0.833x)" in text
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    other = tmp_path / "cpu.json"
    other.write_text(json.dumps(_results("AMD EPYC", {})))
    refused = subprocess.run([sys.executable, "-m", "benchmarks", "--merge", str(paths[0]), str(other), "--out",
                              str(tmp_path / "refused")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "different machines" in refused.stderr, refused.stderr


def test_the_report_judges_first_calls_only_the_daemon_made_warm(tmp_path):
    """hypatia_daemon_warm and hypatia_new_host are set against inductor_warm and eager_backend of
    their workload and mode, with what the process loaded; many-process groups show compiles per
    graph for both backends."""
    counted = {"artifacts_compiled": 0, "artifacts_loaded": 2, "artifacts_waited": 0, "artifacts_took_over": 0,
               "warm_starts": 1}
    first = [{"workload": "gpt2_small", "dtype": "bfloat16", "mode": "training", "config": c, "time_to_first_call_s": t}
             for c, t in (("inductor_warm", 6.0), ("eager_backend", 4.0))]
    first += [
        {"workload": "gpt2_small", "dtype": "bfloat16", "mode": "training", "config": "hypatia_daemon_warm",
         "time_to_first_call_s": 4.5, "artifacts": counted, "daemon_artifacts": {"hits": 2, "misses": 0},
         "inductor_cache": {"fxgraph_cache_hit": 2, "autograd_cache_hit": 1}},
        {"workload": "gpt2_small", "dtype": "bfloat16", "mode": "training", "config": "hypatia_new_host",
         "time_to_first_call_s": 7.0, "artifacts": counted, "daemon_artifacts": {"hits": 2, "misses": 0},
         "inductor_cache": {"fxgraph_cache_hit": 2, "autograd_cache_hit": 1}},
    ]
    group = {"workload": "transformer_block", "mode": "training"}
    multi = [group | {"backend": "hypatia", "processes": 4, "wall_s": 20.0, "compiles_per_graph": 1.0,
                      "artifacts_compiled_per_graph": 1.0, "graphs": 1, "plans_made": 1, "planned_per_graph": 1.0,
                      "artifacts": counted | {"artifacts_waited": 3, "artifacts_loaded": 3}},
             group | {"backend": "inductor", "processes": 4, "wall_s": 40.0, "compiles_per_graph": 4.0}]
    results = _results("NVIDIA H200", {"first_call": {"rows": first, "notes": []},
                                       "multiprocess": {"rows": multi, "notes": []}})
    text = report.write(results, tmp_path)["markdown"].read_text()
    judged = results["summary"]["targets"]["first_call_daemon_warm"]
    assert judged["gpt2_small/training/hypatia_daemon_warm"] == {
        "time_s": 4.5, "inductor_warm_s": 6.0, "eager_backend_s": 4.0, "vs_inductor_warm": 0.75,
        "vs_eager_backend": 1.125, "met": True}
    assert judged["gpt2_small/training/hypatia_new_host"]["met"] is False  # slower than inductor_warm
    assert "| gpt2_small/training/hypatia_daemon_warm | 4.5 | 0.75 | 1.125 | met | 2 / 1 | 2 / 1 | 2 / 0 |" in text
    assert "gpt2_small/training/hypatia_new_host 7 s, 1.167x inductor_warm, 1.75x eager_backend (NOT met)" in text
    assert "| hypatia | 4 | transformer_block | 20 | - | 1 | 1 | 3 / 3 / 0 |" in text
    assert "| inductor | 4 | transformer_block | 40 | - | 4 | - | - |" in text
    assert results["summary"]["multiprocess_compiles_per_graph"] == {"hypatia": {"4": 1.0}, "inductor": {"4": 4.0}}


def test_a_new_host_gets_a_consistent_copy_of_a_store_in_use(tmp_path):
    """The store is copied through SQLite's backup API: a WAL store with a writer still open is
    copied whole, and a missing store is an error rather than an empty copy."""
    import sqlite3

    from benchmarks.compile_sharing import copy_store

    source = tmp_path / "a" / "hypatia.sqlite"
    source.parent.mkdir()
    writer = sqlite3.connect(source)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE plans (k TEXT)")
    writer.executemany("INSERT INTO plans VALUES (?)", [(str(i),) for i in range(100)])
    writer.commit()
    try:
        assert copy_store(source, tmp_path / "b" / "cache" / "hypatia.sqlite") > 0
    finally:
        writer.close()
    copy = sqlite3.connect(tmp_path / "b" / "cache" / "hypatia.sqlite")
    assert copy.execute("SELECT count(*) FROM plans").fetchone() == (100,)
    copy.close()
    with pytest.raises(FileNotFoundError, match="no store"):
        copy_store(tmp_path / "none.sqlite", tmp_path / "c.sqlite")


@pytest.mark.timeout(600)
def test_the_device_benchmark_measures_every_row(tmp_path):
    """``python -m benchmarks.device --quick``: the per-op interception row and, for the small MLP
    in both modes, local eager and the model on the hypatia device from a process that sees no
    GPU (local Hypatia's rows left out here: two more compiles); the weights go up once, each
    step's batch after that."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.device", "--quick", "--steps", "2", "--kinds", "eager,device",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert not [r for r in rows if "error" in r], rows
    intercept = next(r for r in rows if r["kind"] == "intercept")
    assert all(v > 0 for v in intercept["us_per_op"].values()) and intercept["meta_cache_hits"] > 0, intercept
    for mode in ("inference", "training"):
        kinds = {r["kind"]: r for r in rows if r.get("mode") == mode}
        assert set(kinds) == {"eager", "device"}, kinds
        device = kinds["device"]
        assert device["median_ms"] > 0 and device["daemon_device"] == "cpu", device
        batch_bytes = device["batch"] * 512 * 4  # mlp_small's float32 input
        assert device["bytes_up_first"] > 512 * 512 * 4, device  # the weights, once
        assert device["bytes_up_per_step"] == batch_bytes, device  # then only each step's batch
        torch_value = kinds["eager"]["first_value"]
        assert abs(device["first_value"] - torch_value) <= 1e-3 * max(1.0, abs(torch_value)), (device, kinds["eager"])
    assert "| mlp_small | training |" in (tmp_path / "results.md").read_text()
