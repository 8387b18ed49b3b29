"""hypatiad as a user runs it: real daemon subprocesses started through the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading

import pytest
import zmq

from conftest import daemon_stats, wait_until
from hypatia import __version__
from hypatia.canonical import RawNode, canonicalize, environment_key, workload_key
from hypatia.client.rpc import DaemonClient, DaemonUnavailable
from hypatia.config import MAX_IPC_PATH
from hypatia.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    Reply,
    decode_reply,
    encode_request,
    pack,
)

# -- helpers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def client(home, **kw):
    """A DaemonClient for ``home`` that is always closed."""
    c = DaemonClient(home.config, **kw)
    try:
        yield c
    finally:
        c.close()


@contextlib.contextmanager
def raw_dealer(endpoint: str):
    """A bare DEALER connected to the daemon, speaking whatever bytes the test sends."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close(linger=0)
        ctx.term()


def exchange(sock: zmq.Socket, payload: bytes, timeout_ms: int = 3000) -> Reply | None:
    """Send one frame; the decoded reply, or None if nothing comes back in time."""
    sock.send(payload)
    if not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    return decode_reply(sock.recv(), 1 << 24)


def error_code(reply: Reply | None) -> ErrorCode:
    assert reply is not None, "the daemon did not answer"
    assert reply.ok is False, f"expected an error reply, got {reply.body!r}"
    return ErrorCode(reply.body["code"])


@contextlib.contextmanager
def foreground_daemon(home, faults: str):
    """``hypatiad start --foreground`` with HYPATIA_FAULTS, for faults that `hypatiad start`
    cannot wait through (it pings the daemon to see that it is up)."""
    env = home.env | {"HYPATIA_FAULTS": faults}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hypatia.daemon", "start", "--foreground", "--detached"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: home.daemon_pid() == proc.pid and home.config.socket_path.exists(), 15)
        with client(home, timeout_ms=2000, retries=0) as c:
            assert c.call("stats")["pid"] == proc.pid
        yield proc
    finally:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def tiny_plan_request() -> dict:
    """A valid make_plan body: relu of one 2x2 float32 CPU input."""
    meta = ["T", [2, 2], [2, 1], "float32", "cpu"]
    graph, _ = canonicalize(
        [RawNode("placeholder", [0], {}, meta), RawNode("aten.relu.default", [["n", 0]], {}, meta)],
        ["l", [["n", 1]]],
    )
    env = {"device_type": "cpu"}
    return {
        "graph_key": graph.key,
        "workload_key": workload_key([meta])[0],
        "env_key": environment_key(env)[0],
        "graph": graph.to_wire(),
        "workload": [meta],
        "environment": env,
    }


# -- lifecycle --------------------------------------------------------------------------------


def test_start_status_stop_through_the_cli(home):
    """start/status/stop work end to end; stop removes the socket and status then says so."""
    started = home.hypatiad("start")
    assert "started" in started.stdout
    pid = home.daemon_pid()
    assert pid is not None and str(pid) in started.stdout

    status = home.hypatiad("status")
    assert status.returncode == 0
    assert "answering" in status.stdout and "NOT answering" not in status.stdout

    info = json.loads(home.ctl("status", "--json").stdout)
    assert info["running"] is True and info["responding"] is True
    assert info["pid"] == pid
    assert info["version"] == __version__
    assert info["socket"] == home.config.endpoint
    assert home.config.socket_path.exists()

    stopped = home.hypatiad("stop")
    assert f"pid {pid}" in stopped.stdout and "stopped" in stopped.stdout
    assert home.daemon_pid() is None
    assert not home.config.socket_path.exists()

    status = home.hypatiad("status", check=False)
    assert status.returncode == 3
    assert "not running" in status.stdout
    assert json.loads(home.ctl("status", "--json", check=False).stdout)["running"] is False

    again = home.hypatiad("stop", check=False)
    assert again.returncode == 3 and "no hypatiad is running" in again.stderr


def test_runtime_dir_and_socket_are_private(daemon):
    """The runtime directory is 0700 and the socket 0600, both owned by this user."""
    rundir = daemon.config.runtime_dir.stat()
    assert stat.S_IMODE(rundir.st_mode) == 0o700
    assert rundir.st_uid == os.getuid()
    sock = daemon.config.socket_path.lstat()
    assert stat.S_ISSOCK(sock.st_mode)
    assert stat.S_IMODE(sock.st_mode) == 0o600
    assert sock.st_uid == os.getuid()


def test_second_daemon_is_refused(daemon):
    """A second start (detached or foreground) is refused and the first daemon keeps serving."""
    pid = daemon.daemon_pid()

    second = daemon.hypatiad("start", check=False)
    assert second.returncode == 1
    assert "already running" in second.stderr
    assert f"pid {pid}" in second.stderr

    foreground = daemon.hypatiad("start", "--foreground", check=False, timeout=60)
    assert foreground.returncode == 75  # it exits, refused, rather than waiting for the lock
    assert "already running" in foreground.stderr

    assert daemon.daemon_pid() == pid
    assert daemon.config.socket_path.exists()
    assert daemon.stats()["pid"] == pid


# -- stats ------------------------------------------------------------------------------------


def test_stats_reports_counters(daemon):
    """stats --json carries every documented field with values that match what happened."""
    pid = daemon.daemon_pid()
    with client(daemon) as c:
        miss = c.call("get_plan", {"graph_key": "g1-none", "workload_key": "w1-none", "env_key": "e1-none"})
    assert miss == {"plan": None}

    s = daemon.stats()
    assert s["running"] is True
    assert s["version"] == __version__
    assert s["protocol"] == PROTOCOL_VERSION
    assert s["pid"] == pid
    assert isinstance(s["uptime_s"], (int, float)) and s["uptime_s"] >= 0
    assert s["socket"] == daemon.config.endpoint
    assert s["store"]["path"] == str(daemon.config.store_path)
    assert isinstance(s["store"]["size_bytes"], int) and s["store"]["size_bytes"] > 0
    assert s["clients_seen"] >= 2  # the start probe, this test's client, the ctl process
    assert s["requests"]["get_plan"] == 1
    assert s["requests"]["stats"] >= 1
    assert s["requests"]["hello"] >= 2
    assert {"hits", "misses", "hit_rate"} <= s["plan_cache"].keys()
    assert (s["plan_cache"]["hits"], s["plan_cache"]["misses"], s["plan_cache"]["hit_rate"]) == (0, 1, 0.0)
    assert (s["graphs"], s["workloads"], s["plans"]) == (0, 0, 0)
    assert s["fallbacks"] == 0
    assert s["errors"] == {} and s["error_total"] == 0

    table = daemon.ctl("stats", "--all").stdout
    assert "plan-cache hits" in table
    assert "hit rate" in table and "0.0%" in table
    assert str(pid) in table


def test_stats_when_stopped_reads_the_store(daemon):
    """With the daemon stopped, stats --json still answers, says running false, and counts the store."""
    with client(daemon, timeout_ms=10_000) as c:
        assert "regions" in c.call("make_plan", tiny_plan_request())["plan"]
    daemon.hypatiad("stop")

    proc = daemon.ctl("stats", "--json")
    s = json.loads(proc.stdout)
    assert s["running"] is False
    assert s["socket"] == daemon.config.endpoint
    assert s["store"]["path"] == str(daemon.config.store_path)
    assert (s["graphs"], s["workloads"], s["plans"]) == (1, 1, 1)
    assert "not running" in daemon.ctl("stats").stdout


# -- hostile input ----------------------------------------------------------------------------


def test_hostile_input_is_answered_or_dropped_and_daemon_survives(daemon):
    """Garbage at the socket and at the protocol level gets error replies, never a dead daemon."""
    pid = daemon.daemon_pid()

    # (a) raw bytes on the AF_UNIX socket, below ZeroMQ's handshake
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(5)
        raw.connect(str(daemon.config.socket_path))
        raw.sendall(os.urandom(4096))

    with raw_dealer(daemon.config.endpoint) as sock:
        # (b) one frame that is not msgpack
        reply = exchange(sock, b"\xc1\xc1 not msgpack at all \xc1")
        assert error_code(reply) is ErrorCode.BAD_FRAME
        assert reply.request_id is None

        # (c) another protocol version; the request id is echoed
        reply = exchange(sock, pack([999, 31, "hello", {"protocol": 999}]))
        assert error_code(reply) is ErrorCode.VERSION_MISMATCH
        assert reply.request_id == 31

        # (e) a method the daemon does not serve
        reply = exchange(sock, pack([PROTOCOL_VERSION, 32, "rm_rf", {}]))
        assert error_code(reply) is ErrorCode.UNKNOWN_METHOD
        assert reply.request_id == 32

        # (f) a request before hello
        reply = exchange(sock, encode_request(33, "ping"))
        assert error_code(reply) is ErrorCode.NOT_HANDSHAKEN
        assert reply.request_id == 33

        # a multi-part message
        sock.send_multipart([encode_request(34, "ping"), b"extra"])
        assert sock.poll(3000, zmq.POLLIN)
        assert error_code(decode_reply(sock.recv(), 1 << 24)) is ErrorCode.BAD_FRAME

        # after a hello the same peer is served, and bad bodies are BAD_REQUEST
        hello = exchange(sock, encode_request(35, "hello", {"protocol": PROTOCOL_VERSION, "pid": 1, "host": "t"}))
        assert hello is not None and hello.ok and hello.body["pid"] == pid
        reply = exchange(sock, encode_request(36, "get_plan", {"graph_key": 5}))
        assert error_code(reply) is ErrorCode.BAD_REQUEST
        ping = exchange(sock, encode_request(37, "ping"))
        assert ping is not None and ping.ok and ping.body == {"pid": pid}

    with client(daemon) as c:
        assert c.call("ping") == {"pid": pid}

    s = daemon.stats()
    assert s["pid"] == pid
    errors = s["errors"]
    assert errors.get("BAD_FRAME", 0) >= 2
    assert errors.get("VERSION_MISMATCH", 0) >= 1
    assert errors.get("UNKNOWN_METHOD", 0) >= 1
    assert errors.get("NOT_HANDSHAKEN", 0) >= 1
    assert errors.get("BAD_REQUEST", 0) >= 1
    assert s["error_total"] == sum(errors.values())


def test_oversized_frame_is_dropped_by_zeromq(home):
    """A frame over HYPATIA_MAX_MESSAGE_BYTES gets no reply (ZeroMQ drops the peer) and the
    daemon keeps serving others."""
    home.hypatiad("start", extra_env={"HYPATIA_MAX_MESSAGE_BYTES": "65536"})
    pid = home.daemon_pid()

    with raw_dealer(home.config.endpoint) as sock:
        big = encode_request(1, "hello", {"protocol": PROTOCOL_VERSION, "pad": "x" * 200_000})
        assert len(big) > 65536
        assert exchange(sock, big, timeout_ms=1000) is None

    with client(home) as c:
        assert c.call("ping") == {"pid": pid}
    s = home.stats()
    assert s["pid"] == pid
    assert "TOO_LARGE" not in s["errors"]  # it never reached the protocol layer
    assert "hello" in s["requests"]


# -- failures ---------------------------------------------------------------------------------


def test_hung_daemon_makes_the_client_give_up(home):
    """A daemon that drops requests, or is stopped outright, yields DaemonUnavailable after the
    bounded number of attempts (each bounded by its timeout), never a hang."""
    with foreground_daemon(home, "no_reply=ping") as proc:
        with client(home, timeout_ms=200, retries=2) as c, pytest.raises(DaemonUnavailable) as info:
            c.call("ping")
        assert "3 attempt(s)" in str(info.value)
        assert "ping" in str(info.value)

        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with client(home, timeout_ms=200, retries=2) as c, pytest.raises(DaemonUnavailable) as info:
                c.call("stats")
            assert "stats" in str(info.value) and "3 attempt(s)" in str(info.value)
        finally:
            os.kill(proc.pid, signal.SIGCONT)

        with client(home, timeout_ms=5000, retries=0) as c:  # it recovers once continued
            assert c.call("stats")["requests"]["ping"] >= 3


def test_sigterm_drains_in_flight_plan(home):
    """SIGTERM during a make_plan still delivers that plan, then the daemon exits and says so."""
    # planning takes 1.5 s longer, on its worker thread: the server still answers stats meanwhile
    home.hypatiad("start", extra_env={"HYPATIA_FAULTS": "slow_plan=1.5"})
    pid = home.daemon_pid()
    outcome: dict = {}
    handshaken = threading.Event()

    def plan() -> None:
        try:
            with client(home, timeout_ms=15_000, retries=0) as c:
                c.call("ping")  # connect and hello first, so make_plan leaves at once
                handshaken.set()
                outcome["reply"] = c.call("make_plan", tiny_plan_request())
        except Exception as exc:  # reported by the assertions below
            outcome["error"] = exc
            handshaken.set()

    worker = threading.Thread(target=plan)
    worker.start()
    assert handshaken.wait(10)
    # the daemon has taken the make_plan in (on a fast machine it is still planning; on a slow
    # one it may be done, and the drain has nothing to wait for: either way the plan arrives)
    assert wait_until(lambda: daemon_stats(home.config)["requests"].get("make_plan", 0) == 1, 60)
    os.kill(pid, signal.SIGTERM)
    worker.join(20)
    assert not worker.is_alive()

    assert "error" not in outcome, outcome.get("error")
    assert "regions" in outcome["reply"]["plan"]
    assert outcome["reply"]["plan"]["graph_key"] == tiny_plan_request()["graph_key"]
    assert wait_until(lambda: home.daemon_pid() is None, 10)
    assert not home.config.socket_path.exists()
    log = home.config.log_path.read_text()
    assert "received SIGTERM" in log
    assert "stopped" in log
    assert json.loads(home.ctl("stats", "--json").stdout)["plans"] == 1  # the drained plan was stored


def test_fault_at_start_is_reported(home):
    """A daemon that fails while starting makes `hypatiad start` fail loudly and leaves nothing running."""
    proc = home.hypatiad("start", check=False, extra_env={"HYPATIA_FAULTS": "fail_start"})
    assert proc.returncode != 0
    assert "fail_start" in proc.stderr
    assert home.daemon_pid() is None
    assert not home.config.socket_path.exists()
    assert home.hypatiad("status", check=False).returncode == 3


def test_ipc_path_too_long_is_refused(home):
    """A HYPATIA_HOME whose socket path AF_UNIX cannot bind is refused with exit 2 and a hint."""
    long_home = str(home.path / ("d" * 120))
    assert len(long_home) > 110
    proc = home.hypatiad("start", check=False, extra_env={"HYPATIA_HOME": long_home})
    assert proc.returncode == 2
    assert f"longer than {MAX_IPC_PATH} bytes" in proc.stderr
    assert "HYPATIA_HOME" in proc.stderr
    assert not os.path.exists(long_home)


def test_start_that_times_out_leaves_no_daemon_behind(home):
    """A start reported as failed must not leave a daemon holding the lock."""
    proc = home.hypatiad(
        "start", check=False, extra_env={"HYPATIA_FAULTS": "slow_start=4", "HYPATIA_START_TIMEOUT_S": "1"}
    )
    assert proc.returncode == 2 and "did not answer within 1 s" in proc.stderr
    # `start` terminated the process it started and waited for it: nothing is left to bind later
    assert home.daemon_pid() is None and not home.config.socket_path.exists()
    assert "started" in home.hypatiad("start").stdout
