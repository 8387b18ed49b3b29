"""Plan sharing under load: a make_plan miss is acknowledged at once and the daemon keeps saying
it is working, so clients wait past their usual deadline (up to HYPATIA_PLAN_WAIT_S) instead of
planning in-process; a daemon that falls silent or dies still costs only the usual deadline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import daemon_stats, wait_until
from fault_helpers import connection, daemons, linear_relu_request  # noqa: F401  (daemons: a fixture)
from hypatia.canonical import CanonicalGraph
from hypatia.client.rpc import DaemonUnavailable, GaveUpWaiting

# A client process that plans one graph through the backend's session, as a compile does
# (get_plan, make_plan on a miss, in-process planning when the daemon does not answer), after
# all of them are ready; prints where the plan came from, its rules and the session counters.
PLAN_CLIENT = """
import json, sys, time
from pathlib import Path
from hypatia.canonical import CanonicalGraph
from hypatia.client.backend import session

body, ready, go = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), Path(sys.argv[3])
s = session()
ready.touch()
while not go.exists():
    time.sleep(0.01)
keys = (body["graph_key"], body["workload_key"], body["env_key"])
plan, from_daemon = s.plan(CanonicalGraph.from_wire(body["graph"]), keys, body["workload"], body["environment"])
print(json.dumps({"from_daemon": from_daemon, "rules": [r.rule for r in plan.regions], "counters": dict(s.counters)}))
"""


def test_clients_started_together_wait_for_one_slow_plan_instead_of_planning_themselves(home, daemons):
    """Three processes at once against a fresh daemon whose planning takes longer than their
    whole deadline (timeout x attempts): every one gets the daemon's plan, planned once."""
    daemons.start(faults="slow_plan=2.5", extra_env={"HYPATIA_BACKGROUND_TUNING": "0"})
    body = linear_relu_request(4, 16)
    (home.path / "body.json").write_text(json.dumps(body))
    go = home.path / "go"
    env = home.env | {"HYPATIA_TIMEOUT_MS": "400", "HYPATIA_RETRIES": "1", "HYPATIA_AUTOSTART": "0"}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(PLAN_CLIENT), str(home.path / "body.json"),
                               str(home.path / f"ready-{i}"), str(go)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    try:
        assert wait_until(lambda: all((home.path / f"ready-{i}").exists() for i in range(3))
                          or any(p.poll() is not None for p in procs), 120)
        go.touch()
        outputs = [(p, *p.communicate(timeout=120)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, out, err in outputs:
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["from_daemon"] and r["rules"] == ["linear_relu"], r
        c = r["counters"]
        assert "local_plans" not in c and "daemon_plan_gave_up" not in c, c
        assert c.get("daemon_hits", 0) + c.get("daemon_misses", 0) == 1, c
    waited = sum(r["counters"].get("daemon_plan_waits", 0) for r in results)
    assert waited == sum(r["counters"].get("daemon_misses", 0) for r in results) >= 1

    stats = daemon_stats(home.config)
    cache = stats["plan_cache"]
    assert cache["plans_made"] == 1
    assert cache["hits"] + cache["misses"] == 3 and cache["hits"] == 3 - waited
    assert cache["acknowledged"] == cache["waits_served"] == stats["requests"]["make_plan"] >= waited
    assert cache["coalesced"] == stats["requests"]["make_plan"] - 1  # every later make_plan joined the one flight
    assert cache["waits_abandoned"] == 0 and stats["error_total"] == 0


def test_a_client_waits_no_longer_than_plan_wait_and_says_so(home, daemons, monkeypatch):
    """With HYPATIA_PLAN_WAIT_S shorter than the planning, the client gives up, plans the graph
    itself (counted), and tells the daemon, which counts a client that stopped waiting."""
    daemons.start(faults="slow_plan=4", extra_env={"HYPATIA_BACKGROUND_TUNING": "0"})
    # a timeout long enough for the hello and the lookup on a busy machine (a slow answer there is
    # an unavailable daemon, not a wait given up); the acknowledged make_plan still gives up at 1 s
    for name, value in {"HYPATIA_TIMEOUT_MS": "2000", "HYPATIA_RETRIES": "0", "HYPATIA_PLAN_WAIT_S": "1",
                        "HYPATIA_AUTOSTART": "0"}.items():
        monkeypatch.setenv(name, value)
    from hypatia.client.backend import reset_session, session

    reset_session()
    body = linear_relu_request(2, 16)
    s = session()
    plan, from_daemon = s.plan(CanonicalGraph.from_wire(body["graph"]), (body["graph_key"], body["workload_key"],
                               body["env_key"]), body["workload"], body["environment"])
    assert not from_daemon and [r.rule for r in plan.regions] == ["linear_relu"]
    assert s.counters["daemon_plan_gave_up"] == 1 and s.counters["local_plans"] == 1
    assert "daemon_plan_waits" not in s.counters
    assert wait_until(lambda: daemon_stats(home.config)["plan_cache"]["waits_abandoned"] == 1, 10)
    assert daemon_stats(home.config)["plan_cache"]["acknowledged"] == 1


def _make_plan_in_thread(home, body: dict, outcome: dict, **kw) -> threading.Thread:
    def ask() -> None:
        with connection(home, timeout_ms=400, retries=0) as c:
            c.call("ping")
            outcome["ready"] = True
            try:
                outcome["reply"] = c.call("make_plan", body, **kw)
            except Exception as exc:  # noqa: BLE001 - the test looks at which
                outcome["error"] = exc
    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_a_daemon_that_falls_silent_after_acknowledging_costs_the_usual_deadline(home, daemons, how):
    """After the acknowledgement, a daemon that stops answering (SIGSTOP) or dies is given up on
    like any silent daemon: a timeout since its last word, or at once when its process is gone,
    not the whole plan wait."""
    proc = daemons.start(faults="slow_plan=60", extra_env={"HYPATIA_BACKGROUND_TUNING": "0"})
    outcome: dict = {}
    thread = _make_plan_in_thread(home, linear_relu_request(3, 16), outcome, wait_s=120)
    assert wait_until(lambda: daemon_stats(home.config)["plan_cache"]["acknowledged"] == 1, 30)
    os.kill(proc.pid, signal.SIGSTOP if how == "stopped" else signal.SIGKILL)
    try:
        thread.join(30)
        assert not thread.is_alive()
    finally:
        if how == "stopped":
            os.kill(proc.pid, signal.SIGCONT)
    error = outcome.get("error")
    assert isinstance(error, DaemonUnavailable) and not isinstance(error, GaveUpWaiting), outcome
    if how == "stopped":  # the usual deadline, at least a few of the daemon's progress intervals
        assert "acknowledged, then no word from hypatiad for 2000 ms" in str(error)


def test_pending_replies_never_extend_a_call_that_does_not_wait(home, daemons):
    """A caller that passes no wait_s keeps today's deadline: acknowledged or not."""
    daemons.start(faults="slow_plan=60", extra_env={"HYPATIA_BACKGROUND_TUNING": "0"})
    outcome: dict = {}
    thread = _make_plan_in_thread(home, linear_relu_request(5, 16), outcome)
    thread.join(30)
    assert not thread.is_alive()
    error = outcome.get("error")
    assert isinstance(error, DaemonUnavailable) and "no reply within 400 ms" in str(error), outcome
    assert daemon_stats(home.config)["plan_cache"]["acknowledged"] == 1
