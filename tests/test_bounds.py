"""Bounds on what a request may cost the daemon, against real hypatiad subprocesses: graph size,
planning deadline, tuning memory and tuning workers that die, and a stop that ends on time
however stuck the work in flight is."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading

import pytest

from conftest import daemon_stats, wait_until
from fault_helpers import (  # noqa: F401  (daemons: a fixture)
    compile_client,
    connection,
    daemons,
    key_body,
    keys_of,
    linear_relu_request,
)
from hypatia.client.rpc import DaemonUnavailable
from hypatia.protocol import ErrorCode, RemoteError


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def untunable_rows(home) -> dict:
    with sqlite3.connect(home.config.store_path) as conn:
        return {tuple(r[:3]): r[3] for r in conn.execute("SELECT graph_key, workload_key, env_key, reason FROM untunable")}


def test_a_graph_over_the_node_limit_is_refused_by_the_daemon_and_never_sent_by_the_client(home, daemons):
    """The daemon refuses a graph over HYPATIA_MAX_GRAPH_NODES before any work, with TOO_LARGE
    and a message naming the limit; a client with the same limit does not send it, and one with
    a higher limit runs it unrewritten when refused. Both compute what eager computes."""
    daemons.start(extra_env={"HYPATIA_MAX_GRAPH_NODES": "4", "HYPATIA_BACKGROUND_TUNING": "0"})
    body = linear_relu_request(4, 32)
    with connection(home, timeout_ms=30_000, retries=0) as c:
        with pytest.raises(RemoteError) as refused:
            c.call("make_plan", body)
        stats = c.call("stats")
    assert refused.value.code == ErrorCode.TOO_LARGE
    assert "graph of 6 nodes is over this daemon's limit of 4 (HYPATIA_MAX_GRAPH_NODES)" in refused.value.remote_message
    assert stats["planning"]["graphs_too_large"] == 1 and stats["errors"] == {"TOO_LARGE": 1}
    assert stats["plans"] == 0 and stats["plan_cache"]["plans_made"] == 0 and stats["inflight"] == 0

    limited, stderr = compile_client(home, [8], extra_env={"HYPATIA_MAX_GRAPH_NODES": "4", "HYPATIA_TIMEOUT_MS": "30000"})
    assert limited["graphs_not_planned"] == 1
    assert "daemon_misses" not in limited and "local_plans" not in limited and "regions_fused" not in limited
    assert stderr.count("over HYPATIA_MAX_GRAPH_NODES=4") == 1, stderr

    trusting, stderr = compile_client(home, [8], extra_env={"HYPATIA_TIMEOUT_MS": "30000"})
    assert trusting["graphs_not_planned"] == 1 and trusting["daemon_misses"] == 1
    assert "local_plans" not in trusting and "fallbacks" not in trusting
    assert stderr.count("over this daemon's limit of 4") == 1, stderr
    assert daemon_stats(home.config)["planning"]["graphs_too_large"] == 2


def test_planning_past_the_deadline_is_abandoned_its_worker_killed_and_the_daemon_keeps_serving(home, daemons):
    daemons.start(faults="slow_plan=600", extra_env={"HYPATIA_PLAN_DEADLINE_S": "2", "HYPATIA_BACKGROUND_TUNING": "0"})
    body = linear_relu_request(4, 32)
    with connection(home, timeout_ms=60_000, retries=0) as c:
        [worker] = c.call("stats")["planning"]["workers"]
        with pytest.raises(RemoteError) as late:
            c.call("make_plan", body)
        assert late.value.code == ErrorCode.DEADLINE_EXCEEDED
        assert "ran past the daemon's deadline of 2 s (HYPATIA_PLAN_DEADLINE_S)" in late.value.remote_message
        assert wait_until(lambda: not alive(worker), 10)  # the planning and its memory are gone
        with pytest.raises(RemoteError) as again:  # the same graph is refused at once, not planned again
            c.call("make_plan", body)
        assert again.value.code == ErrorCode.DEADLINE_EXCEEDED
        assert c.call("get_plan", key_body(body))["plan"] is None
        stats = c.call("stats")
    assert stats["planning"]["past_deadline"] == 1 and stats["inflight"] == 0 and stats["plans"] == 0
    assert stats["planning"]["worker_events"] == {"started": 2, "JobDeadline": 1}  # replaced at once
    assert worker not in stats["planning"]["workers"]

    # A client that waits that long runs its graph unrewritten instead of planning it itself.
    result, stderr = compile_client(home, [8], extra_env={"HYPATIA_TIMEOUT_MS": "60000", "HYPATIA_PLAN_DEADLINE_S": "2"})
    assert result["graphs_not_planned"] == 1 and result["daemon_misses"] == 1 and "local_plans" not in result
    assert stderr.count("ran past the daemon's deadline of 2 s") == 1, stderr
    assert daemon_stats(home.config)["planning"]["past_deadline"] == 2


def test_a_tuning_over_the_memory_budget_marks_the_plan_untunable_and_no_restart_tunes_it(home, daemons):
    """A 2 KB make_plan describing a 16384 x 16384 fp32 weight: the tuner refuses to allocate it,
    the daemon marks the plan untunable in the store, keeps serving its heuristic plan, and a
    restarted daemon (and hypatia-ctl tune) leaves it alone."""
    env = {"HYPATIA_TUNE_MEMORY_MB": "256", "HYPATIA_TUNE_DELAY_S": "0"}
    first = daemons.start(extra_env=env)
    body = linear_relu_request(4, 16384, inputs=16384)
    with connection(home, timeout_ms=60_000, retries=0) as c:
        plan = c.call("make_plan", body)["plan"]
        assert not plan["tuned"] and [r["rule"] for r in plan["regions"]] == ["linear_relu"]
        assert wait_until(lambda: c.call("stats")["tuning"]["failed"] == 1, 120, interval=0.2)
        stats = c.call("stats")
        assert c.call("get_plan", key_body(body))["plan"]["revision"] == plan["revision"]
    tuning = stats["tuning"]
    assert tuning["marked_untunable"] == 1 and tuning["untunable"] == 1 and tuning["tunings"] == 0
    assert tuning["regions_over_budget"] == 1 and stats["tuning_inflight"] == 0
    [reason] = untunable_rows(home).values()
    assert keys_of(body) in untunable_rows(home)
    assert "needs about" in reason and "over the tuning memory budget of 256 MiB (HYPATIA_TUNE_MEMORY_MB)" in reason

    first.send_signal(signal.SIGTERM)
    assert first.wait(60) == 0
    daemons.start(extra_env=env)
    with connection(home, timeout_ms=60_000, retries=0) as c:
        assert c.call("get_plan", key_body(body))["plan"]["revision"] == plan["revision"]
        explored = c.call("make_plan", body | {"policy": "EXPLORE"})["plan"]  # the plan there is, at once
        assert explored["revision"] == plan["revision"] and not explored["tuned"]
        stats = c.call("stats")
    assert stats["tuning"]["skipped_untunable"] == 2 and stats["tuning_inflight"] == 0
    assert stats["tuning"]["worker"] is None  # the tuner was never even started
    tuned = home.ctl("tune", extra_env=env)
    assert "nothing to tune" in tuned.stdout and "1 plan(s) not tuned again" in tuned.stdout
    stats = daemon_stats(home.config)
    assert stats["tuning"]["tunings"] == 0 and stats["tuning"]["failed"] == 0 and stats["tuning"]["untunable"] == 1


def test_a_background_tuning_waits_for_its_client_to_report(home, daemons):
    """A background tuning does not start while its client may still be compiling: not before
    HYPATIA_TUNE_DELAY_S, unless the client reports on the plan first."""
    daemons.start(extra_env={"HYPATIA_TUNE_DELAY_S": "600", "HYPATIA_TUNE_BUDGET_MS": "1"})
    body = linear_relu_request(4, 32)
    with connection(home, timeout_ms=60_000, retries=0) as c:
        c.call("make_plan", body)
        stats = c.call("stats")
        assert stats["tuning"]["waiting"] == 1 and stats["tuning"]["worker"] is None
        c.call("report", key_body(body) | {"verdicts": []})  # the client is done compiling
        assert wait_until(lambda: c.call("stats")["tuning"]["tunings"] == 1, 120, interval=0.2)
        stats = c.call("stats")
    assert stats["tuning"]["waiting"] == 0 and stats["tuning"]["failed"] == 0


def test_a_tuning_worker_killed_mid_tuning_leaves_the_daemon_serving_and_the_plan_untunable(home, daemons):
    proc = daemons.start(faults="slow_tuning=600", extra_env={"HYPATIA_TUNE_DELAY_S": "0"})
    body = linear_relu_request(4, 32)
    with connection(home, timeout_ms=60_000, retries=0) as c:
        c.call("make_plan", body)
        assert wait_until(lambda: c.call("stats")["tuning"]["worker"] is not None, 30)
        worker = c.call("stats")["tuning"]["worker"]
        os.kill(worker, signal.SIGKILL)
        assert wait_until(lambda: c.call("stats")["tuning"]["failed"] == 1, 60)
        assert c.call("get_plan", key_body(body))["plan"] is not None  # still serving
        stats = c.call("stats")
    assert stats["tuning"]["marked_untunable"] == 1 and stats["tuning_inflight"] == 0
    assert stats["tuning"]["worker_events"]["WorkerDied"] == 1 and stats["tuning"]["worker"] is None
    assert "killed by SIGKILL" in untunable_rows(home)[keys_of(body)]
    assert proc.poll() is None

    # the next tuning gets a fresh worker; a stop kills it instead of waiting for it
    with connection(home, timeout_ms=60_000, retries=0) as c:
        c.call("make_plan", linear_relu_request(5, 32))
        assert wait_until(lambda: c.call("stats")["tuning"]["worker"] not in (None, worker), 30)
        second = c.call("stats")["tuning"]["worker"]
    stopped = home.hypatiad("stop")
    assert "stopped" in stopped.stdout and proc.wait(30) == 0
    assert not alive(second)
    assert len(untunable_rows(home)) == 1  # a tuning cancelled by a stop is not the plan's fault


def test_stop_during_a_stuck_planning_ends_within_the_drain_timeout(home):
    """`hypatiad stop` while a planning cannot finish: the waiting client is told the daemon is
    shutting down, the planning worker is killed, and the daemon exits (stop exits 0) within its
    drain timeout, releasing the lock and the socket."""
    home.env |= {"HYPATIA_FAULTS": "slow_plan=600", "HYPATIA_DRAIN_TIMEOUT_S": "2"}
    home.hypatiad("start")
    pid = home.daemon_pid()
    with connection(home, timeout_ms=60_000, retries=0) as c:
        [worker] = c.call("stats")["planning"]["workers"]
    outcome: dict = {}

    def plan() -> None:
        with connection(home, timeout_ms=60_000, retries=0) as c:
            try:
                outcome["reply"] = c.call("make_plan", linear_relu_request(4, 32))
            except Exception as exc:  # noqa: BLE001 - asserted below
                outcome["error"] = exc

    waiting = threading.Thread(target=plan)
    waiting.start()
    assert wait_until(lambda: daemon_stats(home.config)["inflight"] == 1, 30)
    stopped = home.hypatiad("stop", check=False)
    waiting.join(30)
    assert stopped.returncode == 0 and f"(pid {pid}) stopped" in stopped.stdout, stopped.stderr
    assert not waiting.is_alive() and isinstance(outcome.get("error"), DaemonUnavailable)
    assert "SHUTTING_DOWN" in str(outcome["error"])
    assert home.daemon_pid() is None and home.config.lock_path.read_text() == ""
    assert not home.config.socket_path.exists() and not alive(worker)
    log = home.config.log_path.read_text()
    assert "drain timed out after 2 s (HYPATIA_DRAIN_TIMEOUT_S) with 1 flight(s) unanswered" in log
    assert "hypatiad stopped" in log
