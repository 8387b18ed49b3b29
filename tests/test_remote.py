"""Remote mode (HYPATIA_MODE=remote) against a real hypatiad: models compiled in separate client
processes run in the daemon through the hypatia device's requests, match eager PyTorch, send
their weights once (two processes with the same weights share one copy) and leave no segment
behind: not after a hundred calls through /dev/shm, not after a client is SIGKILLed with a
request in flight. A daemon that is down, silent, restarted or that lost the graph means local
runs, a fresh session or a new registration, never a failed model. (Device requests built by
hand, hostile ones among them: test_device_requests.py; remote mode from another host over
CURVE: test_curve.py.)"""

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
from hypatia.client.remote import NotRemote, remote_graph
from hypatia.config import ConfigError, load
from hypatia.planner import rebuild
from remote_helpers import clean_shm, wait_for

# every test fails if it leaves a segment of this user behind in /dev/shm
pytestmark = pytest.mark.usefixtures(clean_shm.__name__)

# Models and helpers every client program starts with.
PRELUDE = textwrap.dedent(
    """
    import json, os, sys, torch
    from hypatia import shm
    from hypatia.client.backend import session

    def mlp(width=32):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(width, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16),
                                   torch.nn.GELU()).eval()

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
            # a constant tensor of the graph: it goes up once, as an input of the graph
            return self.fc(x.flatten(1)) * torch.tensor([1.0, 2.0] * 5)

    def weight_bytes(*models):  # what a model's graphs read of it, each content once (not BatchNorm's step count)
        contents = {(str(t.dtype), tuple(t.shape), t.detach().numpy().tobytes())
                    for m in models for t in [*m.parameters(), *m.buffers()] if t.is_floating_point()}
        return sum(len(data) for _, _, data in contents)

    def check(compiled, model, x):
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))
        # every segment of a call is gone when the call returns
        assert shm.names_of(os.getpid()) == [], shm.names_of(os.getpid())

    def report(**extra):
        print(json.dumps(dict(session().counters) | extra))
    """
)


def client(home, body: str, extra_env: dict | None = None, timeout: float = 240) -> tuple[dict, str]:
    """Run a client program in remote mode; its counters (last stdout line) and its stderr."""
    env = {"HYPATIA_MODE": "remote"} | (extra_env or {})
    proc = home.python(PRELUDE + textwrap.dedent(body), extra_env=env, timeout=timeout)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


# -- whole models in separate processes ---------------------------------------------------------
def test_mlp_and_conv_net_run_in_the_daemon_match_eager_and_send_their_weights_once(daemon):
    counters, _ = client(daemon, """
        model, net = mlp(), ConvNet().eval()
        compiled = torch.compile(model, backend="hypatia", dynamic=False)
        compiled_net = torch.compile(net, backend="hypatia", dynamic=False)
        batches = 0
        for i in range(5):
            x, y = torch.randn(8, 32), torch.randn(2, 3, 6, 6)
            check(compiled, model, x)
            check(compiled_net, net, y)
            batches += (x.numel() + y.numel()) * 4
        x = torch.randn(32, 8).t()  # a transposed input: another graph, the same weights
        check(compiled, model, x)
        batches += x.numel() * 4
        report(weights=weight_bytes(model, net) + 10 * 4, batches=batches)  # and the constant tensor
    """)
    assert counters["remote_runs"] == 11 and counters.get("remote_fallbacks", 0) == 0
    assert counters["remote_graphs"] == 3 and counters.get("remote_local_graphs", 0) == 0
    assert counters["remote_sessions"] == 1
    assert counters["remote_bytes_up"] == counters["weights"] + counters["batches"]  # the weights went up once
    device = daemon.stats()["device"]
    assert device["executes"] == 11 and device["executables_cached"] == 3
    assert device["bytes_uploaded"] == counters["remote_bytes_up"]
    assert device["bytes_fetched"] == counters["remote_bytes_down"] == 5 * (8 * 16 + 2 * 10) * 4 + 8 * 16 * 4
    assert device["sessions"] == 0 and device["memory_used_bytes"] == 0  # released when the client exited
    assert daemon.stats()["requests"].get("run", 0) == 0
    line = {row[:20].strip(): row[20:] for row in daemon.ctl("stats", "--all").stdout.splitlines()}["hypatia device"]
    assert "11 graphs run" in line and "3 executables cached" in line


def test_the_weights_go_up_once_and_a_second_process_finds_them_by_content(daemon):
    """The first client keeps its session open while the second runs the same model: the second
    sends no weight, only its batches."""
    first = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent('''
        model = mlp(256)
        compiled = torch.compile(model, backend="hypatia", dynamic=False)
        for i in range(3):
            check(compiled, model, torch.randn(64, 256))
        print(json.dumps(dict(session().counters)), flush=True)
        sys.stdin.readline()
    ''')], env=daemon.env | {"HYPATIA_MODE": "remote"}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        counters_first = json.loads(first.stdout.readline())
        counters_second, _ = client(daemon, """
            model = mlp(256)
            compiled = torch.compile(model, backend="hypatia", dynamic=False)
            for i in range(3):
                check(compiled, model, torch.randn(64, 256))
            report()
        """)
    finally:
        first.communicate("\n", timeout=60)
    weights = (256 * 64 + 64 + 64 * 16 + 16) * 4
    batch = 64 * 256 * 4
    assert counters_first["remote_runs"] == counters_second["remote_runs"] == 3
    assert counters_first["remote_bytes_up"] == weights + 3 * batch
    assert counters_second["remote_bytes_up"] == 3 * batch  # the weights were found by content
    device = daemon.stats()["device"]
    assert device["uploads_shared"] == 4 and device["bytes_not_moved"] == weights


def test_a_hundred_calls_through_shared_memory_leave_dev_shm_clean(daemon):
    counters, _ = client(daemon, """
        model = mlp()
        compiled = torch.compile(model, backend="hypatia", dynamic=False)
        for i in range(100):
            check(compiled, model, torch.randn(2048, 32))  # 256 KiB up, 128 KiB down: segments both ways
        report()
    """)
    weights = (32 * 64 + 64 + 64 * 16 + 16) * 4
    assert counters["remote_runs"] == 100
    assert counters["remote_bytes_up"] == weights + 100 * 2048 * 32 * 4
    assert counters["remote_bytes_down"] == 100 * 2048 * 16 * 4
    device = daemon.stats()["device"]
    assert device["executes"] == 100 and device["segments_swept"] == 0  # the client removed everything itself
    assert daemon.daemon_pid() is not None


SLOW_CLIENT = """
    model = mlp()
    compiled = torch.compile(model, backend="hypatia", dynamic=False)
    i = 0
    while True:
        print("call", i, flush=True)
        check(compiled, model, torch.randn(2048, 32))
        i += 1
"""


def test_client_killed_with_a_request_in_flight_leaves_segments_the_daemon_sweeps(home):
    home.env["HYPATIA_FAULTS"] = "delay=device:2"  # every device request waits: the client dies with one in flight
    home.hypatiad("start")
    env = home.env | {"HYPATIA_MODE": "remote", "HYPATIA_RUN_TIMEOUT_MS": "60000"}
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(SLOW_CLIENT)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "call 1":  # the first call came back; the second is being sent
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

    def settled() -> bool:  # the request nobody waits for is over, its session and segments are gone
        device = daemon_stats(home.config)["device"]
        return device["sessions"] == 0 and device["memory_used_bytes"] == 0 and not shm.names_of(proc.pid)

    try:
        wait_for(settled, timeout=30, what="the daemon to drop the dead client's session and sweep its segments")
    except AssertionError:
        print(daemon_stats(home.config)["device"], shm.names_of(proc.pid), (home.path / "cache" / "hypatiad.log").read_text()[-3000:] if (home.path / "cache" / "hypatiad.log").exists() else list(home.path.rglob("*.log")))
        raise
    assert home.stats()["device"]["segments_swept"] >= len(left)


def test_a_call_answered_too_late_runs_locally_and_leaves_nothing(home):
    home.env["HYPATIA_FAULTS"] = "delay=device:3"
    home.hypatiad("start")
    counters, stderr = client(home, """
        model = mlp()
        compiled = torch.compile(model, backend="hypatia", dynamic=False)
        for i in range(3):
            check(compiled, model, torch.randn(8, 32))
        report()
    """, extra_env={"HYPATIA_RUN_TIMEOUT_MS": "500"})
    # the first call gave up and left its session; the next ones leave the silent daemon alone a while
    assert counters.get("remote_runs", 0) == 0 and counters["remote_fallbacks"] == 3
    assert stderr.count("RemoteModeWarning") == 1 and "did not answer" in stderr
    # the daemon answers the late request to nobody, then drops whatever the exited client held
    wait_for(lambda: daemon_stats(home.config)["device"]["sessions"] == 0, what="the session to be dropped")
    assert daemon_stats(home.config)["device"]["memory_used_bytes"] == 0


def test_daemon_down_runs_locally_and_a_restarted_daemon_serves_again_in_a_fresh_session(daemon):
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
        assert session().counters["remote_runs"] == 1
        control.start(load())
        for i in range(2):
            check(compiled, model, torch.randn(8, 32))
            check(compiled_net, net, torch.randn(2, 3, 6, 6))
        report()
    """, extra_env={"HYPATIA_AUTOSTART": "0"})
    assert counters["remote_fallbacks"] == 4 and counters["local_plans"] == 1
    # the first call after the restart found its session unknown and went again in a fresh one
    assert counters["remote_runs"] == 5 and counters["remote_sessions"] == 2
    assert stderr.count("RemoteModeWarning") == 1  # warned once for the kind of failure
    assert daemon.stats()["device"]["executes"] == 4  # the restarted daemon's


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
    assert daemon.stats()["device"].get("executes", 0) == 0


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
    assert counters.get("remote_fallbacks", 0) == 0 and counters["remote_sessions"] == 1
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
    (lambda x: (x.clone().add_(1),), "writes to one of its arguments"),
    (lambda x: (x + torch.rand_like(x),), "draws random numbers (the daemon's generator is not this process's)"),
], ids=["in-place", "random"])
def test_graphs_the_daemon_should_not_run_say_why(fn, reason):
    gm = aten_graph(fn, torch.randn(4))
    output_type = type(gm.graph.output_node().args[0])
    with pytest.raises(NotRemote, match=reason.replace("(", r"\(").replace(")", r"\)")):
        remote_graph(gm, gm, output_type)


def test_a_remote_graph_takes_its_constants_as_inputs_and_names_the_daemon_s_device_as_meta():
    gm = aten_graph(lambda x: (x + torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.zeros(4, device="cpu")), torch.randn(4))
    graph = remote_graph(gm, gm, tuple)
    assert [tuple(c.tolist()) for c in graph.lifted] == [(1.0, 2.0, 3.0, 4.0)]
    assert [tuple(m.shape) for m in graph.metas] == [(4,), (4,)] and all(m.device.type == "meta" for m in graph.metas)
    devices = [a for n in graph.call.gm.graph.nodes for a in n.kwargs.values() if isinstance(a, torch.device)]
    assert devices and all(d.type == "meta" for d in devices)


def test_a_late_reply_s_segments_are_reclaimed_and_no_others():
    from hypatia.config import load as load_config
    from hypatia.device.link import Link

    link = Link(load_config({"HYPATIA_HOME": "/tmp/hy-x"}))
    link.late.add("late0001")
    pid = os.getpid()
    late = [shm.put(torch.ones(2), shm.segment_name("d0test00", pid, f"late0001o{k}")).name for k in range(2)]
    other = [shm.put(torch.ones(2), shm.segment_name("d0test00", pid, name)).name for name in ("late0001u0", "busy0001o0")]
    try:
        assert link.reclaim() == 2 and link.counters["late_segments_reclaimed"] == 2
        assert shm.names_of(pid) == sorted(other)
    finally:
        for name in [*late, *other]:
            shm.unlink(name)
        link.close()


@pytest.mark.parametrize("op", ["os.system", "aten.__class__.default", "aten.add", "builtins.eval.default",
                                "aten.nonexistent_op.default", "aten.add_.Tensor"])
def test_op_names_from_the_wire_resolve_to_functional_aten_overloads_only(op):
    with pytest.raises(rebuild.NotRebuildable):
        rebuild.resolve_op(op)
