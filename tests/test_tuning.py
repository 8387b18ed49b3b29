"""The many-paths planner: path graph and policies, the tuner's traces, tuning in the daemon
(background, EXPLORE, single flight across processes), recipes, and `hypatia-ctl` plans, tune
and flush."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from graphs import aten_graph, assert_training_step_matches
from hypatia.client.capture import capture, graph_workload_key
from hypatia.config import ConfigError, load
from hypatia.planner import paths, plan_graph
from hypatia.planner.counters import counters
from hypatia.planner.environment import describe
from hypatia.planner.passes import UnknownPolicy, candidates, finish
from hypatia.planner.plan import EAGER, Decision, ExecutorDecision, ExecutorTime, Plan, PlanFormatError, Region, recipe_text
from hypatia.planner.store import Store


def block(x, w, b, g, beta):
    """linear + ReLU, a pointwise chain, a layer norm written out: three candidate regions."""
    y = torch.nn.functional.linear(x, w, b).relu()
    y = y * 2.0 + 1.0
    mu = y.mean(-1, keepdim=True)
    var = ((y - mu) ** 2).mean(-1, keepdim=True)
    return (y - mu) / torch.sqrt(var + 1e-5) * g + beta


def block_inputs():
    torch.manual_seed(0)
    return (torch.randn(32, 64), torch.randn(128, 64), torch.randn(128), torch.randn(128), torch.randn(128))


@pytest.fixture(scope="module")
def captured():
    inputs = block_inputs()
    graph, fx_nodes = capture(aten_graph(block, *inputs))
    env_key, env = describe("cpu")
    return graph, fx_nodes, inputs, env_key, env


def _measured(graph, state, env, fast: set[str], eager_us: float = 50.0, fused_us: float = 5.0, slow_us: float = 500.0):
    """Measurements for every implementation of every candidate: eager ``eager_us``; those
    whose id is in ``fast`` ``fused_us``, the others ``slow_us``."""
    out = {}
    for rkey, impls in paths.wanted(graph, list(state.candidates), env).items():
        for impl in impls:
            us = eager_us if impl == EAGER else fused_us if impl in fast else slow_us
            out[(rkey, impl)] = paths.Measurement(us / 1e6, True)
    return out


# -- path graph and policies -------------------------------------------------------------------
def test_heuristic_plan_fuses_and_records_its_decisions(captured):
    graph, _, _, _, env = captured
    plan = plan_graph(graph, "HEURISTIC", env)
    assert plan.policy == "HEURISTIC" and not plan.tuned
    assert {r.rule for r in plan.regions} >= {"linear_relu", "layer_norm"}
    assert len(plan.decisions) >= 3
    chosen = {d.output: d.chosen for d in plan.decisions}
    assert all(chosen[r.output] == r.implementation for r in plan.regions)
    assert all(not d.measured for d in plan.decisions)


def test_eager_is_always_a_candidate_and_wins_where_it_measures_faster(captured):
    graph, _, _, _, env = captured
    state = candidates(graph, env)
    slower_fused = _measured(graph, state, env, fast=set(), eager_us=10.0)
    plan = finish(state, "FASTEST", slower_fused)
    assert plan.tuned and plan.policy == "FASTEST"
    assert plan.regions == ()
    assert {d.chosen for d in plan.decisions} == {EAGER}
    # the heuristic would have fused: every such decision is a place the measurements overruled it
    assert any(d.heuristic != EAGER for d in plan.decisions)


def test_fastest_takes_the_measured_fastest_implementation(captured):
    graph, _, _, _, env = captured
    state = candidates(graph, env)
    impls = {i for v in paths.wanted(graph, list(state.candidates), env).values() for i in v if i != EAGER}
    layer_norm = next(i for i in impls if i.startswith("normalization/"))
    plan = finish(state, "FASTEST", _measured(graph, state, env, fast={layer_norm}))
    assert [r.implementation for r in plan.regions] == [layer_norm]


def test_an_implementation_that_failed_its_accuracy_check_is_never_chosen(captured):
    graph, _, _, _, env = captured
    state = candidates(graph, env)
    measured = _measured(graph, state, env, fast={i for v in paths.wanted(graph, list(state.candidates), env).values() for i in v})
    measured = {k: paths.Measurement(v.median_s, ok=k[1] == EAGER) for k, v in measured.items()}
    before = counters["paths.excluded"]
    plan = finish(state, "FASTEST", measured)
    assert plan.regions == ()
    assert counters["paths.excluded"] > before


def test_overlapping_candidates_form_one_cluster_whose_best_set_wins():
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

        def forward(self, x):
            return self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    m = MLP()
    params = dict(m.named_parameters())
    graph, _ = capture(aten_graph(lambda x, *p: torch.func.functional_call(m, dict(zip(params, p)), (x,)),
                                  torch.randn(8, 32), *params.values()))
    _, env = describe("cpu")
    state = candidates(graph, env)
    rules = sorted(c.rule for c in state.candidates)
    assert rules == ["linear_gelu", "mlp_gelu"]
    assert len(paths.clusters(list(state.candidates))) == 1
    mlp = next(i for v in paths.wanted(graph, list(state.candidates), env).values() for i in v if i.startswith("mlp/"))
    lin = next(i for v in paths.wanted(graph, list(state.candidates), env).values() for i in v if i.startswith("linear_"))
    for fast, rule in ((mlp, "mlp_gelu"), (lin, "linear_gelu")):
        plan = finish(state, "FASTEST", _measured(graph, state, env, fast={fast}))
        assert [r.rule for r in plan.regions] == [rule]


def test_gpu_regions_get_a_host_path_unless_the_copies_alone_lose():
    """A CUDA region has device backends and a host path (device -> host -> device); with the
    default ceilings a host round trip for a small region is pruned."""
    # Build the graph's canonical form with CUDA meta without a GPU: meta tensors claim cuda.
    inputs = block_inputs()
    graph, _ = capture(aten_graph(block, *inputs))
    nodes = tuple(n.__class__(n.op, n.args, n.kwargs, _as_cuda(n.meta), n.users) for n in graph.nodes)
    cuda_graph = graph.__class__(nodes, graph.outputs, graph.node_keys)
    env = {"device_type": "cuda", "cupy": "14.0"}
    state = candidates(cuda_graph, env)
    chain = next(c for c in state.candidates if c.rule == "pointwise_chain")
    kinds = {(r.kernel.split("/")[1], r.placement) for r in paths.implementations(cuda_graph, chain, env)}
    assert kinds == {("gpu_torch", "device"), ("gpu_cupy", "device"), ("cpu_torch", "host")}
    before = counters["paths.pruned_round_trips"]
    g = paths.path_graph(cuda_graph, list(state.candidates), env, state.model)
    assert counters["paths.pruned_round_trips"] > before
    host_nodes = [n for n in g.nodes if n[-1] == "host"]
    assert not any(n[-2] == "pointwise/cpu_torch/generated@host" for n in host_nodes)  # tiny chain: pruned
    # measured, the host path is an edge like any other and is taken when it is fastest
    measured = _measured(cuda_graph, state, env, fast={"pointwise/cpu_torch/generated@host"})
    plan = finish(state, "FASTEST", measured)
    assert [(r.rule, r.placement) for r in plan.regions] == [("pointwise_chain", "host")]


def _as_cuda(meta):
    if isinstance(meta, list) and meta and meta[0] == "T":
        return [*meta[:4], "cuda"]
    if isinstance(meta, list) and meta and meta[0] == "tuple":
        return ["tuple", [_as_cuda(m) for m in meta[1]]]
    return meta


def test_unknown_policy_is_a_clear_error(captured, monkeypatch):
    with pytest.raises(UnknownPolicy, match="HEURISTIC, EXPLORE, FASTEST"):
        plan_graph(captured[0], "FAST")
    with pytest.raises(ConfigError, match="HYPATIA_POLICY='SOMETIMES'"):
        load({"HYPATIA_POLICY": "sometimes", "HYPATIA_HOME": "/tmp/hy-x"})
    assert load({"HYPATIA_POLICY": "explore", "HYPATIA_HOME": "/tmp/hy-x"}).policy == "EXPLORE"


# -- recipes -----------------------------------------------------------------------------------
def test_recipe_json_round_trip():
    plan = Plan(
        "g1-abc",
        (Region("linear_relu", "linear_activation/cpu_torch/relu", (0, 1, 2), ([4, 8],), 5, (4, 5)),
         Region("pointwise_chain", "pointwise/cpu_torch/generated", (5,), ({"ops": []},), 7, (6, 7), placement="host")),
        policy="FASTEST", revision=3, validated=(5,), tuned=True,
        decisions=(Decision("linear_relu", 5, "linear_activation/cpu_torch/relu", 1e-6, 2e-6, True, EAGER, 2e-6),
                   Decision("layer_norm", 9, EAGER, 3e-6, 3e-6, True, "normalization/cpu_torch/layer_norm", 4e-6)),
        executor=ExecutorDecision("inductor+cudagraphs", True, (ExecutorTime("inductor+cudagraphs", 812.5, 3.25, 10),
                                                                ExecutorTime("eager", 1650.0, 9.0, 10),
                                                                ExecutorTime("aten", 0.0, error="RuntimeError: no"))),
    )
    text = recipe_text(plan.to_recipe())
    back = Plan.from_recipe(json.loads(text))
    assert back == plan
    assert recipe_text(back.to_recipe()) == text
    assert json.loads(text)["format"] == 3
    # a new revision of the regions (a tuned plan) is another rewritten graph: measured anew
    assert plan.superseding(plan).executor == plan.executor
    assert replace(plan, regions=plan.regions[:1]).superseding(plan).executor is None
    assert plan.without({7}, set()).executor is None and plan.without(set(), {5}).executor == plan.executor


def test_format_1_recipes_are_still_read_and_bad_ones_refused():
    old = {"format": 1, "graph_key": "g1-x", "policy": "HEURISTIC", "revision": 1, "validated": [],
           "regions": [{"rule": "r", "kernel": "k", "inputs": [0], "consts": [], "output": 1, "nodes": [1]}]}
    plan = Plan.from_recipe(old)
    assert plan.regions[0].placement == "device" and not plan.tuned and plan.decisions == ()
    for bad in ({**old, "format": 4}, {**old, "regions": [{**old["regions"][0], "placement": "moon"}]},
                {**old, "format": 2, "tuned": "yes"}, {**old, "format": 3, "executor": {"chosen": 1}},
                {**old, "format": 3, "executor": "inductor"}):
        with pytest.raises(PlanFormatError):
            Plan.from_recipe(bad)


def test_superseding_keeps_its_own_validation_and_the_old_where_the_implementation_is_the_same():
    a = Region("linear_relu", "k1", (0,), (), 5, (5,))
    b = Region("layer_norm", "k2", (5,), (), 9, (9,))
    old = Plan("g", (a, b), revision=2, validated=(5, 9))
    new = Plan("g", (a, Region("layer_norm", "k3", (5,), (), 9, (9,))), policy="FASTEST", tuned=True)
    sup = new.superseding(old)
    assert sup.revision == 3 and sup.validated == (5,)
    # what the new plan's own verdicts validated stays validated (the tuner's accuracy checks)
    assert replace(new, validated=(9,)).superseding(old).validated == (5, 9)


# -- the tuner in-process: traces, ceilings once, reuse ----------------------------------------
def test_tuner_writes_a_trace_per_implementation_and_measures_ceilings_once(captured, tmp_path):
    from hypatia.planner import tuner

    graph, _, inputs, env_key, env = captured
    wkey, workload = graph_workload_key(list(inputs))
    keys = (graph.key, wkey, env_key)
    store = Store(tmp_path / "s.sqlite")
    store.put_plan(keys, graph.to_wire(), workload, env, plan_graph(graph, env=env), [])
    report = tuner.TuneReport()
    plan = tuner.tune(graph, keys, env, store, budget_s=0.01, report=report)
    assert plan.tuned and plan.policy == "FASTEST"
    state = candidates(graph, env)
    wanted = paths.wanted(graph, list(state.candidates), env)
    rows = store.query("SELECT region_key, implementation_id, median_us, spread_us, repeats, max_rel_error, ok, rule, "
                       "graph_key, env_key FROM benchmark_traces")
    assert sorted((r[0], r[1]) for r in rows) == sorted((k, i) for k, v in wanted.items() for i in v)
    assert report.measured == len(rows) and report.reused == 0
    for rkey, impl, median, spread, repeats, err, ok, rule, gk, ek in rows:
        assert median > 0 and spread >= 0 and repeats >= 5 and ok == 1, (impl, rule)
        assert err is not None and err >= 0 and gk == graph.key and ek == env_key  # ok == 1 is the tolerance check
    # every decision is measured and the chosen implementation is the fastest measured one
    by = {(r[0], r[1]): r[2] for r in rows}
    for cand in state.candidates:
        d = next(d for d in plan.decisions if d.output == cand.region.output and d.rule == cand.rule)
        assert d.measured
    implementations = {r[0] for r in store.query("SELECT id FROM implementations")}
    assert {i for _, i in by} <= implementations
    (ceilings_at,) = store.query("SELECT measured_at FROM environments WHERE key = ?", (env_key,))[0]
    assert ceilings_at and store.ceilings(env_key)["cpu"]["bytes_per_s"] > 0
    # again: nothing is measured twice, not even the ceilings
    again = tuner.TuneReport()
    tuner.tune(graph, keys, env, store, budget_s=0.01, report=again)
    assert again.measured == 0 and again.reused == len(rows)
    assert store.query("SELECT count(*) FROM benchmark_traces")[0][0] == len(rows)
    assert store.query("SELECT measured_at FROM environments WHERE key = ?", (env_key,))[0][0] == ceilings_at


def test_tuner_refuses_another_environment(captured, tmp_path):
    from hypatia.planner import tuner

    graph, _, inputs, _, env = captured
    with pytest.raises(tuner.EnvironmentMismatch, match="same environment"):
        tuner.tune(graph, (graph.key, "w1-x", "e1-elsewhere"), env, Store(tmp_path / "s.sqlite"))


# -- tuning in the daemon ----------------------------------------------------------------------
CLIENT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_tuning import block, block_inputs
    from hypatia.client.backend import session

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.w, self.b = torch.nn.Parameter(torch.randn(128, 64)), torch.nn.Parameter(torch.randn(128))
            self.g, self.beta = torch.nn.Parameter(torch.randn(128)), torch.nn.Parameter(torch.randn(128))
        def forward(self, x):
            return block(x, self.w, self.b, self.g, self.beta)

    m = Block().eval()
    x = block_inputs()[0]
    with torch.no_grad():
        out = torch.compile(m, backend="hypatia")(x)
        torch.testing.assert_close(out, m(x), rtol=1e-4, atol=1e-4)
    plans = [p.to_recipe() for _, p in session().plans]
    print(json.dumps({{"counters": dict(session().counters), "plans": plans}}))
    """
)


def _client(home, policy: str, timeout: float = 180) -> dict:
    import os

    code = CLIENT.format(tests=os.path.dirname(__file__))
    proc = home.python(code, timeout=timeout, extra_env={"HYPATIA_POLICY": policy})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _start(home, **env) -> None:
    home.env.update({"HYPATIA_TUNE_BUDGET_MS": "10", "HYPATIA_TUNE_DELAY_S": "0", **env})
    assert "started" in home.hypatiad("start").stdout


def _wait_for(home, predicate, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = home.stats()
        if predicate(stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {json.dumps(stats)[:2000]}")
        time.sleep(0.3)


def test_fastest_answers_at_once_tunes_in_the_background_and_serves_the_tuned_plan_after(home):
    _start(home)
    first = _client(home, "FASTEST")
    assert first["counters"]["daemon_misses"] == 1
    assert not first["plans"][0]["tuned"] and first["plans"][0]["policy"] == "HEURISTIC"
    stats = _wait_for(home, lambda s: s["tuning"]["tunings"] >= 1)
    assert stats["tuning"]["tunings"] == 1 and stats["traces"] > 0 and stats["tuning"]["failed"] == 0
    second = _client(home, "FASTEST")  # a new process: the tuned plan, from the cache
    assert second["counters"]["daemon_hits"] == 1
    plan = second["plans"][0]
    assert plan["tuned"] and plan["policy"] == "FASTEST" and plan["revision"] > first["plans"][0]["revision"]
    assert all(d["measured"] for d in plan["decisions"])
    assert home.stats()["tuning"]["tunings"] == 1  # a tuned plan is not tuned again


def test_heuristic_never_measures(home):
    _start(home)
    out = _client(home, "HEURISTIC")
    assert out["plans"][0]["policy"] == "HEURISTIC" and not out["plans"][0]["tuned"]
    # a tuning is queued before the answer that would cause it leaves the daemon: by now it
    # would be in flight or done, however slow the machine
    stats = home.stats()
    assert stats["tuning"]["tunings"] == 0 and stats["traces"] == 0 and stats["tuning_inflight"] == 0


def test_background_tuning_can_be_switched_off(home):
    _start(home, HYPATIA_BACKGROUND_TUNING="0")
    _client(home, "FASTEST")
    stats = home.stats()  # a tuning would be queued before the plan's answer left the daemon
    assert stats["tuning"]["tunings"] == 0 and stats["tuning_inflight"] == 0 and stats["tuning"]["background"] is False


def test_explore_waits_for_measurements_and_a_heuristic_client_still_gets_a_heuristic_plan(home):
    _start(home)
    out = _client(home, "EXPLORE")
    plan = out["plans"][0]
    assert plan["tuned"] and plan["policy"] == "EXPLORE"
    assert all(d["measured"] for d in plan["decisions"])
    store = Store(home.config.store_path, readonly=True)
    assert store.query("SELECT count(*) FROM benchmark_traces WHERE ok = 1")[0][0] > 0
    assert store.query("SELECT tuned FROM plans")[0][0] == 1
    store.close()
    heuristic = _client(home, "HEURISTIC")
    assert heuristic["plans"][0]["policy"] == "HEURISTIC" and not heuristic["plans"][0]["tuned"]
    assert _client(home, "FASTEST")["plans"][0]["tuned"]  # the stored plan is still the tuned one


def test_many_concurrent_clients_cause_one_tuning(home):
    _start(home)
    n = 8
    with ThreadPoolExecutor(n) as pool:
        outs = list(pool.map(lambda _: _client(home, "EXPLORE", timeout=300), range(n)))
    stats = home.stats()
    assert stats["tuning"]["tunings"] == 1, stats["tuning"]
    recipes = [o["plans"][0] for o in outs]
    assert all(r["tuned"] for r in recipes)
    assert len({json.dumps(r["regions"], sort_keys=True) for r in recipes}) == 1  # everyone runs the same plan
    store = Store(home.config.store_path, readonly=True)
    traces = store.query("SELECT count(*), count(DISTINCT region_key || implementation_id) FROM benchmark_traces")[0]
    store.close()
    assert traces[0] == traces[1]  # no region and implementation measured twice


def test_bad_policy_in_a_request_is_refused(home):
    _start(home)
    from hypatia.client.rpc import DaemonClient
    from hypatia.protocol import ErrorCode, RemoteError

    client = DaemonClient(home.config, retries=0)
    try:
        with pytest.raises(RemoteError) as err:
            client.call("get_plan", {"graph_key": "g", "workload_key": "w", "env_key": "e", "policy": "FAST"})
        assert err.value.code == ErrorCode.BAD_REQUEST and "FAST" in err.value.remote_message
        assert client.call("ping")["pid"] == home.daemon_pid()
    finally:
        client.close()


# -- hypatia-ctl plans, tune, flush -----------------------------------------------------------
def test_ctl_plans_tune_and_flush(home):
    _start(home, HYPATIA_BACKGROUND_TUNING="0")
    _client(home, "FASTEST")
    listing = home.ctl("plans").stdout
    assert "linear_relu" in listing and " no " in listing
    rows = json.loads(home.ctl("plans", "--json").stdout)
    assert len(rows) == 1 and not rows[0]["tuned"]
    key = rows[0]["graph_key"]
    shown = home.ctl("plans", key[:10]).stdout
    assert key in shown and "decisions" in shown and "not tuned" in shown
    missing = home.ctl("plans", "g1-nope", check=False)
    assert missing.returncode == 2 and "no stored plan" in missing.stderr
    tuned = home.ctl("tune")
    assert "tuning [" in tuned.stderr and "1/1" in tuned.stderr and "tuned 1 plan(s)" in tuned.stdout
    assert json.loads(home.ctl("plans", "--json").stdout)[0]["tuned"]
    shown = json.loads(home.ctl("plans", key[:10], "--json").stdout)
    assert shown["recipe"]["tuned"] and all(d["measured"] for d in shown["recipe"]["decisions"])
    assert "nothing to tune" in home.ctl("tune").stdout
    refused = home.ctl("flush", check=False)  # stdin is not a terminal: no silent deletion
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert len(json.loads(home.ctl("plans", "--json").stdout)) == 1
    flushed = home.ctl("flush", "--yes").stdout
    assert "1 plans" in flushed and "benchmark_traces" in flushed
    assert json.loads(home.ctl("plans", "--json").stdout) == []
    assert home.stats()["plans"] == 0
    again = _client(home, "FASTEST")  # the daemon plans afresh after a flush
    assert again["counters"]["daemon_misses"] == 1


def test_ctl_flush_with_the_daemon_down_removes_the_store(home):
    _start(home, HYPATIA_BACKGROUND_TUNING="0")
    _client(home, "HEURISTIC")
    home.hypatiad("stop")
    assert home.config.store_path.exists()
    out = home.ctl("flush", "--yes").stdout
    assert "1 plans" in out and not home.config.store_path.exists()
    after = home.ctl("plans", check=False)
    assert after.returncode == 2 and "no store at" in after.stderr


def test_ctl_flush_asks_at_a_terminal(home):
    _start(home, HYPATIA_BACKGROUND_TUNING="0")
    _client(home, "HEURISTIC")
    script = "import sys; sys.stdin.isatty = lambda: True; from hypatia.daemon.ctl import main; sys.exit(main(['flush']))"
    no = subprocess.run([sys.executable, "-c", script], input="n\n", env=home.env, capture_output=True, text=True, timeout=60)
    assert no.returncode == 1 and "nothing deleted" in no.stdout
    assert home.stats()["plans"] == 1
    yes = subprocess.run([sys.executable, "-c", script], input="y\n", env=home.env, capture_output=True, text=True, timeout=60)
    assert yes.returncode == 0 and "flushed" in yes.stdout
    assert home.stats()["plans"] == 0


def test_heuristic_policy_runs_the_plan_without_measuring(home, dynamo_reset, monkeypatch):
    from hypatia.client.backend import session

    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    monkeypatch.setenv("HYPATIA_POLICY", "HEURISTIC")
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU()).eval()
    compiled = torch.compile(model, backend="hypatia")
    with torch.no_grad():
        for _ in range(30):
            compiled(torch.randn(4, 32))
    assert session().counters["regions_fused"] == 1 and not session().choices


def test_a_failed_tuning_serves_the_plan_there_is_and_is_counted(home):
    _start(home, HYPATIA_FAULTS="fail_tuning")
    out = _client(home, "EXPLORE")
    plan = out["plans"][0]
    assert not plan["tuned"] and plan["policy"] == "HEURISTIC" and plan["regions"]
    assert out["counters"].get("fallbacks", 0) == 0 and out["counters"]["regions_fused"] >= 1
    stats = home.stats()
    assert stats["tuning"]["failed"] == 1 and stats["tuning"]["tunings"] == 0 and stats["traces"] == 0
