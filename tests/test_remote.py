"""Remote mode (HYPATIA_MODE=remote) against a real hypatiad: models compiled in separate
client processes run in the daemon on tensors passed through /dev/shm, match eager PyTorch, and
leave no segment behind: not after hundreds of transfers, not after a client is SIGKILLed with
a request in flight. A daemon that is down, silent or that lost the graph means local runs or a
new registration, never a failed model. (Run requests built by hand, hostile ones among them:
test_remote_requests.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import daemon_stats
from graphs import aten_graph
from hypatia import shm
from hypatia.client import capture as cap
from hypatia.config import ConfigError, load
from hypatia.planner import rebuild
from remote_helpers import clean_shm, wait_for  # noqa: F401  (a fixture)

# every test fails if it leaves a segment of this user behind in /dev/shm
pytestmark = pytest.mark.usefixtures("clean_shm")

# Models and helpers every client program starts with.
PRELUDE = textwrap.dedent(
    """
    import json, os, sys, torch
    from hypatia import shm
    from hypatia.client.backend import session

    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16), torch.nn.GELU()).eval()

    class ConvNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.conv2 = torch.nn.Conv2d(8, 8, 3)
            self.fc = torch.nn.Linear(8 * 2 * 2, 10)
        def forward(self, x):
            x = torch.relu(self.bn(self.conv1(x)))
            x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
            return self.fc(x.flatten(1))

    def check(compiled, model, x):
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))
        # every segment of a call is gone when the call returns
        assert shm.names_of(os.getpid()) == [], shm.names_of(os.getpid())

    def report():
        print(json.dumps(dict(session().counters)))
    """
)


def client(home, body: str, extra_env: dict | None = None, timeout: float = 240) -> tuple[dict, str]:
    """Run a client program in remote mode; its counters (last stdout line) and its stderr."""
    env = {"HYPATIA_MODE": "remote"} | (extra_env or {})
    proc = home.python(PRELUDE + textwrap.dedent(body), extra_env=env, timeout=timeout)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


# -- whole models in separate processes ---------------------------------------------------------
def test_mlp_and_conv_net_run_in_the_daemon_and_match_eager(daemon):
    counters, _ = client(daemon, """
        model, net = mlp(), ConvNet().eval()
        compiled = torch.compile(model, backend="hypatia", dynamic=False)
        compiled_net = torch.compile(net, backend="hypatia", dynamic=False)
        for i in range(5):
            check(compiled, model, torch.randn(8, 32))
            check(compiled_net, net, torch.randn(2, 3, 6, 6))
        check(compiled, model, torch.randn(32, 8).t())  # a transposed input keeps its strides
        report()
    """)
    assert counters["remote_runs"] == 11 and counters.get("remote_fallbacks", 0) == 0
    assert counters["remote_graphs"] == 3 and counters.get("remote_local_graphs", 0) == 0
    assert counters["regions_fused"] >= 2  # the daemon ran plans with fused regions
    stats = daemon.stats()
    assert stats["remote"]["runs"] == 11 and stats["remote"]["errors"] == 0
    assert stats["remote"]["executables_built"] >= 3
    assert stats["requests"]["run"] == 11
    transfers = counters["shm_segments_created"] + counters["shm_segments_received"]
    assert stats["shm"]["transfers"] == transfers
    assert stats["shm"]["segments_written"] == counters["shm_segments_received"] == 11
    assert stats["shm"]["bytes"] == counters["shm_bytes_sent"] + counters["shm_bytes_received"]
    lines = {line[:20].strip(): line[20:] for line in daemon.ctl("stats", "--all").stdout.splitlines()}
    assert lines["remote runs"].startswith("11 run, 0 failed")
    assert lines["shared memory"].startswith(f"{transfers} transfers")


def test_hundreds_of_transfers_leave_dev_shm_clean(daemon):
    counters, _ = client(daemon, """
        model = mlp()
        compiled = torch.compile(model, backend="hypatia", dynamic=False)
        for i in range(100):
            check(compiled, model, torch.randn(4, 32))
        report()
    """)
    assert counters["remote_runs"] == 100
    stats = daemon.stats()
    assert stats["shm"]["transfers"] == 600  # five inputs (x, two weights, two biases) and one output a call
    assert stats["shm"]["segments_swept"] == 0  # the client removed everything itself
    assert daemon.daemon_pid() is not None


SLOW_CLIENT = """
    model = mlp()
    compiled = torch.compile(model, backend="hypatia", dynamic=False)
    i = 0
    while True:
        print("call", i, flush=True)
        check(compiled, model, torch.randn(4, 32))
        i += 1
"""


def test_client_killed_with_a_request_in_flight_leaves_segments_the_daemon_sweeps(home):
    home.env["HYPATIA_FAULTS"] = "delay=run:2"  # every run waits: the client dies while one is in flight
    home.hypatiad("start")
    env = home.env | {"HYPATIA_MODE": "remote", "HYPATIA_RUN_TIMEOUT_MS": "60000"}
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(SLOW_CLIENT)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "call 1":  # the first run came back; the second is being sent
                break
        else:
            raise AssertionError(f"client exited: {proc.stderr.read()}")
        wait_for(lambda: shm.names_of(proc.pid), what="the request's segments")
        left = shm.names_of(proc.pid)
        time.sleep(0.5)  # the request leaves right after its segments are written; the daemon sits on it 2 s
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert left, "the request was in flight when the client died"

    def settled() -> bool:  # the run nobody waits for is over, and the sweep has been
        remote = daemon_stats(home.config)["remote"]
        return remote["abandoned"] + remote["errors"] == 1 and not shm.names_of(proc.pid)

    wait_for(settled, what="the daemon to drop the orphaned run and sweep its segments")
    stats = home.stats()
    assert stats["shm"]["segments_swept"] >= len(left)
    assert stats["remote"]["runs"] == 1


def test_a_call_answered_too_late_runs_locally_and_leaves_nothing(home):
    home.env["HYPATIA_FAULTS"] = "delay=run:3"
    home.hypatiad("start")
    counters, _ = client(home, """
        model = mlp()
        compiled = torch.compile(model, backend="hypatia", dynamic=False)
        for i in range(3):
            check(compiled, model, torch.randn(8, 32))
        report()
    """, extra_env={"HYPATIA_RUN_TIMEOUT_MS": "500"})
    # the first call gave up and unlinked its segments; the next ones leave the silent daemon alone
    assert counters.get("remote_runs", 0) == 0 and counters["remote_fallbacks"] == 3
    # when the daemon got to the request, its segments were gone: refused, nothing ran, nothing written
    wait_for(lambda: daemon_stats(home.config)["errors"].get("BAD_REQUEST") == 1, what="the late run to be refused")
    assert daemon_stats(home.config)["shm"]["segments_written"] == 0


def test_daemon_down_runs_locally_with_correct_outputs(daemon):
    counters, stderr = client(daemon, """
        from hypatia.daemon import control
        from hypatia.config import load
        model, net = mlp(), ConvNet().eval()
        compiled = torch.compile(model, backend="hypatia", dynamic=False)
        check(compiled, model, torch.randn(8, 32))
        assert session().counters["remote_runs"] == 1
        control.stop(load())
        check(compiled, model, torch.randn(8, 32))
        compiled_net = torch.compile(net, backend="hypatia", dynamic=False)  # planned here: no daemon
        for i in range(3):
            check(compiled_net, net, torch.randn(2, 3, 6, 6))
        report()
    """, extra_env={"HYPATIA_AUTOSTART": "0"})
    assert counters["remote_runs"] == 1 and counters["remote_fallbacks"] == 4
    assert counters["local_plans"] == 1
    assert stderr.count("RemoteModeWarning") == 1  # warned once for the kind of failure
    assert daemon.daemon_pid() is None


def test_training_graph_runs_locally_with_one_warning(daemon):
    counters, stderr = client(daemon, """
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
        torch.manual_seed(0)
        reference = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
        compiled = torch.compile(model, backend="hypatia", dynamic=False)
        for i in range(2):
            x = torch.randn(8, 32)
            out, expected = compiled(x), reference(x)
            torch.testing.assert_close(out, expected)
            out.sum().backward(); expected.sum().backward()
            for p, q in zip(model.parameters(), reference.parameters()):
                torch.testing.assert_close(p.grad, q.grad)
        report()
    """)
    assert counters.get("remote_runs", 0) == 0 and counters["remote_local_graphs"] == 1  # the training model graph
    assert stderr.count("RemoteModeWarning") == 1 and "training graph" in stderr
    assert daemon.stats()["remote"]["runs"] == 0


def test_daemon_that_lost_the_graph_gets_it_again(home):
    home.env["HYPATIA_BACKGROUND_TUNING"] = "0"  # flush refuses while a tuning runs
    home.hypatiad("start")
    counters, _ = client(home, """
        from hypatia.daemon import control
        from hypatia.config import load
        model = mlp()
        compiled = torch.compile(model, backend="hypatia", dynamic=False)
        check(compiled, model, torch.randn(8, 32))
        control.flush(load())
        check(compiled, model, torch.randn(8, 32))
        check(compiled, model, torch.randn(8, 32))
        report()
    """)
    assert counters["remote_runs"] == 3 and counters["remote_reregistered"] == 1
    assert counters.get("remote_fallbacks", 0) == 0
    assert home.stats()["errors"].get("UNKNOWN_GRAPH") == 1


# -- units ------------------------------------------------------------------------------------
def test_mode_is_checked_at_load():
    assert load({"HYPATIA_HOME": "/tmp/hy-x", "HYPATIA_MODE": "Remote"}).mode == "remote"
    assert load({"HYPATIA_HOME": "/tmp/hy-x"}).mode == "local"
    with pytest.raises(ConfigError, match="HYPATIA_MODE='cloud' is not one of local, remote"):
        load({"HYPATIA_HOME": "/tmp/hy-x", "HYPATIA_MODE": "cloud"})


def test_rebuilt_graph_computes_what_the_captured_one_does():
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 8), torch.randn(3, 8), torch.randn(3)
    fn = lambda x, w, b: (torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b), approximate="tanh").sum(-1, keepdim=True),
                          torch.softmax(x, dim=-1)[:, 1:3])  # noqa: E731
    gm = aten_graph(fn, x, w, b)
    graph, _ = cap.capture(gm)
    rebuilt, nodes = rebuild.graph_module(graph)
    assert len(nodes) == len(graph.nodes)
    for got, want in zip(rebuilt(x, w, b), fn(x, w, b)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fn, reason", [
    (lambda x: (x + torch.tensor([1.0, 2.0, 3.0, 4.0]),), "constant tensor"),
    (lambda x: (x.clone().add_(1),), "writes to one of its arguments"),
    (lambda x: (x + torch.rand_like(x),), "draws random numbers"),
], ids=["constant", "in-place", "random"])
def test_graphs_the_daemon_cannot_rebuild_say_why(fn, reason):
    graph, _ = cap.capture(aten_graph(fn, torch.randn(4)))
    assert reason in (rebuild.unsupported(graph) or "")


def test_reclaim_removes_this_processs_segments_but_those_of_calls_in_progress():
    from collections import Counter
    from hypatia.client.remote import RemoteRunner

    runner = RemoteRunner(load({"HYPATIA_HOME": "/tmp/hy-x"}), client=None, counters=Counter())
    runner._live.add("busy0001")
    pid = os.getpid()
    late = [shm.put(torch.ones(2), shm.segment_name("d0test00", pid, f"late0001o{k}")).name for k in range(2)]
    busy = shm.put(torch.ones(2), shm.segment_name("d0test00", pid, "busy0001i0")).name
    try:
        assert runner.reclaim() == 2 and runner.counters["shm_reclaimed"] == 2
        assert shm.names_of(pid) == [busy]
    finally:
        for name in [*late, busy]:
            shm.unlink(name)


@pytest.mark.parametrize("op", ["os.system", "aten.__class__.default", "aten.add", "builtins.eval.default",
                                "aten.nonexistent_op.default", "aten.add_.Tensor"])
def test_op_names_from_the_wire_resolve_to_functional_aten_overloads_only(op):
    with pytest.raises(rebuild.NotRebuildable):
        rebuild.resolve_op(op)
