"""Faults against real hypatiad subprocesses and real client processes: version skew in both
directions, 64 concurrent clients and SIGTERM under load. (The store's faults are in
test_store_faults.py; SIGKILL mid-request, SIGSTOP, restart and hostile input in
test_end_to_end.py, test_daemon.py and test_fuzz.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import msgpack
import pytest
import zmq

from conftest import daemon_stats, wait_until
from fault_helpers import (  # noqa: F401  (daemons: a fixture)
    COMPILE_CLIENT,
    OTHER_PROTOCOL,
    RAW_CLIENT,
    SKEWED_CLIENT_PRELUDE,
    compile_client,
    connection,
    daemons,
    keys_of,
    linear_relu_request,
    stored_plan_keys,
)
from hypatia.client.rpc import DaemonUnavailable
from hypatia.protocol import PROTOCOL_VERSION, ErrorCode


# -- version skew -----------------------------------------------------------------------------


def test_daemon_of_another_protocol_is_refused_at_the_handshake_and_the_client_plans_itself(home, daemons):
    """A daemon speaking protocol N+1: the client's hello is refused once (no retries, no
    waiting), it plans in-process for the rest of the process, says so once, and counts it."""
    proc = daemons.start(faults=f"protocol_version={OTHER_PROTOCOL}")
    result, stderr = compile_client(home, [8, 12], extra_env={"HYPATIA_TIMEOUT_MS": "30000"})

    assert result["version_skew"] == 1  # the second graph did not ask again
    assert result["local_plans"] == 2 and result["regions_fused"] == 2
    assert "daemon_hits" not in result and "daemon_misses" not in result and "fallbacks" not in result
    assert stderr.count("speaks another protocol") == 1, stderr
    assert f"daemon speaks protocol {OTHER_PROTOCOL}, this client {PROTOCOL_VERSION}" in stderr

    # The daemon is still up, refused exactly one hello, and logged it.
    assert proc.poll() is None
    log = daemons.log()
    assert "refused a peer at the handshake (1 refusal(s) so far)" in log
    assert "(2 refusal(s) so far)" not in log
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(home.config.endpoint)
    try:
        replies = []
        for rid, method, body in ((1, "hello", {"protocol": OTHER_PROTOCOL}), (2, "stats", {})):
            sock.send(msgpack.packb([OTHER_PROTOCOL, rid, method, body]))
            assert sock.poll(10_000), f"no answer to {method} in the daemon's own protocol"
            replies.append(msgpack.unpackb(sock.recv(), raw=False))
    finally:
        sock.close(0)
        ctx.term()
    assert [r[:3] for r in replies] == [[OTHER_PROTOCOL, 1, "ok"], [OTHER_PROTOCOL, 2, "ok"]]
    stats = replies[1][3]
    assert stats["protocol"] == OTHER_PROTOCOL
    assert stats["errors"] == {ErrorCode.VERSION_MISMATCH.name: 1}
    assert "get_plan" not in stats["requests"] and stats["plans"] == 0

    # hypatia-ctl says what is wrong instead of failing
    info = json.loads(home.ctl("stats", "--json").stdout)
    assert "speaks another protocol" in info["note"]


def test_client_of_another_protocol_is_refused_at_the_handshake_and_plans_itself(daemon):
    """A client speaking protocol N+1 against this daemon: the same clean refusal and
    fallback; the daemon stays up, counts and logs the refusal, and serves others (the
    stats below come through a client of this version)."""
    pid = daemon.daemon_pid()
    result, stderr = compile_client(daemon, [8, 12], prelude=SKEWED_CLIENT_PRELUDE,
                                    extra_env={"HYPATIA_TIMEOUT_MS": "30000"})

    assert result["version_skew"] == 1
    assert result["local_plans"] == 2 and result["regions_fused"] == 2
    assert "daemon_hits" not in result and "daemon_misses" not in result and "fallbacks" not in result
    assert stderr.count("speaks another protocol") == 1, stderr
    assert f"daemon speaks protocol {PROTOCOL_VERSION}, this client {OTHER_PROTOCOL}" in stderr

    stats = daemon.stats()
    assert stats["pid"] == pid
    assert stats["errors"] == {ErrorCode.VERSION_MISMATCH.name: 1}
    assert "get_plan" not in stats["requests"]  # its hello never got through
    assert stats["plans"] == 0
    log = daemon.config.log_path.read_text()
    assert f"client speaks protocol {OTHER_PROTOCOL}, this daemon speaks {PROTOCOL_VERSION}" in log
    assert "(2 refusal(s) so far)" not in log


# -- 64 concurrent clients ---------------------------------------------------------------------


def test_64_concurrent_client_processes(home, daemons):
    """64 processes at once against one daemon: 8 compile a model through the real backend (two
    distinct graphs), 56 ask for plans of four other graphs as the backend does. Every one
    succeeds with the right plan or output; each distinct graph is planned exactly once; no
    'database is locked' anywhere."""
    daemons.start()
    compile_widths = [8, 8, 8, 8, 12, 12, 12, 12]
    raw_bodies = [linear_relu_request(batch, 24) for batch in (1, 2, 3, 4)]
    bodies_file = home.path / "bodies.json"
    bodies_file.write_text(json.dumps(raw_bodies))
    go = home.path / "go"
    env = home.env | {"HYPATIA_TIMEOUT_MS": "60000", "HYPATIA_AUTOSTART": "0"}  # a slow answer is still an answer

    def spawn(argv: list[str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", *argv], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    raw = [spawn([textwrap.dedent(RAW_CLIENT), str(bodies_file), str(i % 4), str(home.path / f"ready-{i}"), str(go)])
           for i in range(56)]
    compiled = [spawn([textwrap.dedent(COMPILE_CLIENT.format(prelude="")), str(w)]) for w in compile_widths]
    try:
        assert wait_until(lambda: all((home.path / f"ready-{i}").exists() for i in range(56))
                          or any(p.poll() for p in raw), 90)
        go.touch()
        outputs = [(p, *p.communicate(timeout=180)) for p in raw + compiled]
    finally:
        for p in raw + compiled:
            if p.poll() is None:
                p.kill()
                p.wait()

    locked = [err[-2000:] for _, out, err in outputs if "database is locked" in out + err]
    assert not locked, f"{len(locked)} client(s) saw 'database is locked', the first:\n{locked[0]}"
    for p, out, err in outputs:
        assert p.returncode == 0, err[-3000:]
    raw_results = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in outputs[:56]]
    assert all(r["rules"] == ["linear_relu"] for r in raw_results), raw_results
    compile_results = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in outputs[56:]]
    for r in compile_results:
        assert r.get("daemon_hits", 0) + r.get("daemon_misses", 0) == 1, r
        assert "local_plans" not in r and "fallbacks" not in r and r["regions_fused"] == 1, r

    stats = daemon_stats(home.config)
    cache = stats["plan_cache"]
    assert cache["plans_made"] == 6  # four raw graphs and two compiled ones, each planned once
    assert cache["hits"] + cache["misses"] == 64
    assert stats["requests"]["make_plan"] == cache["misses"] == cache["coalesced"] + cache["plans_made"]
    assert sum(r["hit"] for r in raw_results) + sum(r.get("daemon_hits", 0) for r in compile_results) == cache["hits"]
    assert stats["error_total"] == 0 and stats["fallbacks"] == 0 and stats["plans"] == 6
    assert stats["clients_seen"] >= 64
    assert "database is locked" not in daemons.log()


# -- SIGTERM under load ------------------------------------------------------------------------


def test_sigterm_under_load_drains_every_request_in_flight(home, daemons):
    """16 clients with make_plan in flight on eight slow plannings, then SIGTERM: each gets its
    plan, a client arriving during the drain is turned away at once, the daemon exits 0 and
    leaves no pid, socket or lock holder behind, and a later client plans in-process."""
    # the drain waits for every plan in flight: on a busy machine eight of them take longer than
    # the default 20 s, which is not what this test is about
    proc = daemons.start(faults="slow_plan=1.0", extra_env={"HYPATIA_BACKGROUND_TUNING": "0",
                                                           "HYPATIA_DRAIN_TIMEOUT_S": "150"})
    bodies = [linear_relu_request(batch, 32) for batch in range(1, 9)]
    bodies_file = home.path / "bodies.json"
    bodies_file.write_text(json.dumps(bodies))
    go = home.path / "go"
    go.touch()  # no start line: they are in flight when the stats say so
    env = home.env | {"HYPATIA_TIMEOUT_MS": "60000", "HYPATIA_RETRIES": "0", "HYPATIA_AUTOSTART": "0"}
    clients = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(RAW_CLIENT), str(bodies_file), str(i % 8),
                                 str(home.path / f"ready-{i}"), str(go)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(16)]
    try:
        def all_in_flight() -> bool:
            stats = daemon_stats(home.config)
            return stats["requests"].get("make_plan", 0) == 16 and stats["inflight"] == 8
        assert wait_until(all_in_flight, 90, interval=0.1), daemon_stats(home.config)
        os.kill(proc.pid, signal.SIGTERM)

        with connection(home, timeout_ms=10_000, retries=0) as late:  # intake is closed during the drain
            # refused with SHUTTING_DOWN, not left to its 10 s timeout (which would say "no reply")
            with pytest.raises(DaemonUnavailable, match="SHUTTING_DOWN"):
                late.call("make_plan", linear_relu_request(9, 32))

        outputs = [(p, *p.communicate(timeout=120)) for p in clients]
    finally:
        for p in clients:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out, err in outputs:
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1]) == {"hit": False, "rules": ["linear_relu"]}

    assert proc.wait(60) == 0
    assert home.daemon_pid() is None and home.config.lock_path.read_text() == ""
    assert not home.config.socket_path.exists()
    log = daemons.log()
    assert "received SIGTERM: draining 8 flight(s)" in log and "hypatiad stopped" in log
    assert "drain timed out" not in log
    assert stored_plan_keys(home.config.store_path) == {keys_of(b) for b in bodies}

    after, stderr = compile_client(home, [8], extra_env={"HYPATIA_AUTOSTART": "0"})
    assert after["local_plans"] == 1 and after["regions_fused"] == 1
    assert "daemon_misses" not in after and "fallbacks" not in after, stderr
    assert home.daemon_pid() is None
