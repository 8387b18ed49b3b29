"""Faults against real hypatiad subprocesses and real client processes: version skew in both
directions, a truncated database file, SIGKILL during writes, 64 concurrent clients and SIGTERM
under load. (SIGKILL mid-request, SIGSTOP, restart and hostile input are in test_end_to_end.py,
test_daemon.py and test_fuzz.py.)

Daemons here run as ``hypatiad start --foreground --detached`` children of the test, so that
a test can SIGKILL one at a moment of its choosing, reap it and read its exit status.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import msgpack
import pytest
import zmq

from conftest import wait_until
from hypatia.canonical import CanonicalGraph, RawNode, canonicalize, workload_key
from hypatia.client.rpc import DaemonClient, DaemonUnavailable
from hypatia.planner import environment, plan_graph
from hypatia.planner.store import Store
from hypatia.protocol import PROTOCOL_VERSION, ErrorCode, RemoteError

OTHER_PROTOCOL = PROTOCOL_VERSION + 1

# -- programs run as client processes ---------------------------------------------------------

# Compiles one Linear+ReLU model per width given on the command line with backend="hypatia",
# checks each output against eager, and prints its session counters as JSON on the last line.
# PRELUDE (empty, or code that makes this process speak another protocol) runs first.
COMPILE_CLIENT = """
import json, sys, torch
{prelude}
from hypatia.client.backend import session

for width in map(int, sys.argv[1:]):
    torch.manual_seed(width)
    model = torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.ReLU())
    x = torch.randn(4, width)
    with torch.no_grad():
        out = torch.compile(model, backend="hypatia", dynamic=False)(x)
        torch.testing.assert_close(out, model(x))
print(json.dumps(dict(session().counters)))
"""

# A client of the daemon without torch: connects and handshakes, says it is ready, waits for
# the go file, then asks for the plan of one request body as the backend does (get_plan, and
# make_plan on a miss). Prints whether it was a hit and the plan's fused rules.
RAW_CLIENT = """
import json, sys, time
from pathlib import Path
from hypatia.client.rpc import DaemonClient
from hypatia.config import load

bodies, index, ready, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
body = json.loads(bodies.read_text())[index]
client = DaemonClient(load())
client.call("ping")
ready.touch()
while not go.exists():
    time.sleep(0.01)
keys = {k: body[k] for k in ("graph_key", "workload_key", "env_key")}
plan = client.call("get_plan", keys)["plan"]
hit = plan is not None
if not hit:
    plan = client.call("make_plan", body)["plan"]
assert plan["graph_key"] == body["graph_key"], plan
print(json.dumps({"hit": hit, "rules": [r["rule"] for r in plan["regions"]]}))
"""

SKEWED_CLIENT_PRELUDE = f"""
import hypatia.protocol, hypatia.client.rpc
hypatia.protocol.PROTOCOL_VERSION = hypatia.client.rpc.PROTOCOL_VERSION = {OTHER_PROTOCOL}
"""


def compile_client(home, widths: list[int], prelude: str = "", extra_env: dict | None = None) -> tuple[dict, str]:
    """Run COMPILE_CLIENT in a fresh process; its counters and its stderr."""
    proc = home.run("-c", textwrap.dedent(COMPILE_CLIENT.format(prelude=prelude)), *map(str, widths),
                    extra_env=extra_env, timeout=180)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


# -- daemons ----------------------------------------------------------------------------------


class Daemons:
    """Starts hypatiad processes for one home and reaps every one of them at the end."""

    def __init__(self, home):
        self.home = home
        self.procs: list[subprocess.Popen] = []

    def start(self, faults: str = "", extra_env: dict | None = None) -> subprocess.Popen:
        """A daemon serving on the home's socket (it may speak another protocol, so readiness
        is its pid in the lock file and its socket, not an answer)."""
        env = self.home.env | {"HYPATIA_FAULTS": faults} | (extra_env or {})
        self.home.config.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.home.config.log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "hypatia.daemon", "start", "--foreground", "--detached"],
                                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.procs.append(proc)
        ready = wait_until(lambda: proc.poll() is not None or (
            self.home.daemon_pid() == proc.pid and self.home.config.socket_path.exists()), 60)
        assert ready and proc.poll() is None, f"hypatiad exited with {proc.returncode}:\n{self.log()[-3000:]}"
        return proc

    def log(self) -> str:
        return self.home.config.log_path.read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, sig)
            proc.wait(30)


@pytest.fixture
def daemons(home) -> Iterator[Daemons]:
    d = Daemons(home)
    try:
        yield d
    finally:
        d.close()


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


@contextlib.contextmanager
def connection(home, **kw) -> Iterator[DaemonClient]:
    c = DaemonClient(home.config, **kw)
    try:
        yield c
    finally:
        c.close()


def daemon_stats(home) -> dict:
    with connection(home, timeout_ms=30_000, retries=0) as c:
        return c.call("stats")


# -- plan requests without torch in the client ------------------------------------------------


def linear_relu_request(batch: int, features: int, inputs: int = 8) -> dict:
    """A make_plan body for relu(addmm(b, x, w.t())) with these sizes, keyed for this CPU."""
    def meta(shape: list[int], stride: list[int] | None = None) -> list:
        return ["T", shape, stride or ([shape[1], 1] if len(shape) == 2 else [1]), "float32", "cpu"]

    x, w, b = meta([batch, inputs]), meta([features, inputs]), meta([features])
    y = meta([batch, features])
    graph, _ = canonicalize(
        [
            RawNode("placeholder", [0], {}, x),
            RawNode("placeholder", [1], {}, w),
            RawNode("placeholder", [2], {}, b),
            RawNode("aten.t.default", [["n", 1]], {}, meta([inputs, features], [1, inputs])),
            RawNode("aten.addmm.default", [["n", 2], ["n", 0], ["n", 3]], {}, y),
            RawNode("aten.relu.default", [["n", 4]], {}, y),
        ],
        ["n", 5],
    )
    env_key, env = environment.describe("cpu")
    return {
        "graph_key": graph.key,
        "workload_key": workload_key([x, w, b])[0],
        "env_key": env_key,
        "graph": graph.to_wire(),
        "workload": [x, w, b],
        "environment": env,
    }


def keys_of(body: dict) -> tuple[str, str, str]:
    return body["graph_key"], body["workload_key"], body["env_key"]


def key_body(body: dict) -> dict:
    return dict(zip(("graph_key", "workload_key", "env_key"), keys_of(body)))


def stored_plan_keys(path: Path) -> set[tuple[str, str, str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return set(conn.execute("SELECT graph_key, workload_key, env_key FROM plans").fetchall())


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


# -- a truncated database file -----------------------------------------------------------------


def checkpoint(path: Path) -> None:
    """Fold the WAL into the database file (what the last connection to close does)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


@pytest.mark.parametrize("shape", [
    "cut in half after a clean stop",
    # with a WAL that holds page 1, a truncated file opens and would fail only at the first read
    # of a lost page: the store's integrity check at open is what catches it
    "cut in half after a crash, its WAL kept",
])
def test_truncated_store_is_quarantined_and_replanned(home, daemons, shape):
    """The daemon starts on a truncated store file: the file is moved aside and counted, every
    graph is planned again (a miss, never a hit of what the file held) and runs right."""
    home.env["HYPATIA_BACKGROUND_TUNING"] = "0"  # no tuner writes racing the cut
    store_path = home.config.store_path
    widths = [8, 12, 16]
    proc = daemons.start()
    first, _ = compile_client(home, widths)
    assert first["daemon_misses"] == 3
    home.hypatiad("stop")
    assert proc.wait(30) == 0
    checkpoint(store_path)
    if shape.endswith("WAL kept"):
        proc = daemons.start()
        with connection(home, timeout_ms=30_000) as c:  # rows that live only in the WAL
            for batch in (2, 3):
                c.call("make_plan", linear_relu_request(batch, 16))
        kill(proc)
        assert Path(f"{store_path}-wal").stat().st_size > 0
    else:
        assert not Path(f"{store_path}-wal").exists()
    size = store_path.stat().st_size
    os.truncate(store_path, size // 2)

    daemons.start()
    stats = daemon_stats(home)
    assert stats["store_quarantined"] == 1 and stats["plans"] == 0
    aside = [p.name for p in store_path.parent.iterdir() if p.name.startswith(f"{store_path.name}.corrupt-")]
    assert any(not name.endswith(("-wal", "-shm")) for name in aside), aside
    assert "is unreadable" in daemons.log()

    again, stderr = compile_client(home, widths)
    assert again["daemon_misses"] == 3 and "daemon_hits" not in again, again
    assert "fallbacks" not in again and again["regions_fused"] == 3, stderr
    stats = daemon_stats(home)
    assert stats["plan_cache"]["plans_made"] == 3 and stats["plans"] == 3
    assert stats["error_total"] == 0 and stats["corrupt_rows"] == 0


# -- SIGKILL during writes ---------------------------------------------------------------------


def drive_make_plans(home, bodies: list[dict], threads: int, replied: dict, errors: list) -> list[threading.Thread]:
    """Send ``bodies`` as make_plan requests from ``threads`` clients until the daemon goes;
    each plan received goes into ``replied`` (keys -> recipe), each error reply into ``errors``."""
    def work(share: list[dict]) -> None:
        with connection(home, timeout_ms=60_000, retries=0) as c:
            for body in share:
                try:
                    recipe = c.call("make_plan", body)["plan"]
                except DaemonUnavailable:
                    return  # killed: what was not answered is re-planned after the restart
                except RemoteError as exc:  # an error reply is a defect: it would reach a user
                    errors.append(str(exc))
                    continue
                replied[keys_of(body)] = recipe

    workers = [threading.Thread(target=work, args=(bodies[i::threads],), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    return workers


def check_restarted_daemon(home, asked: list[dict], stored: set) -> None:
    """A freshly started daemon: every plan committed before the kill is a hit, every other
    one is a miss and is planned again; nothing read from the store is corrupt."""
    hits = misses = 0
    with connection(home, timeout_ms=60_000, retries=0) as c:
        for body in asked:
            recipe = c.call("get_plan", key_body(body))["plan"]
            if keys_of(body) in stored:
                assert recipe is not None and recipe["graph_key"] == body["graph_key"]
                hits += 1
            else:
                assert recipe is None
                misses += 1
                assert c.call("make_plan", body)["plan"]["graph_key"] == body["graph_key"]
        stats = c.call("stats")
    assert stats["plan_cache"]["hits"] == hits and stats["plan_cache"]["misses"] == misses
    assert stats["plan_cache"]["plans_made"] == misses
    assert stats["corrupt_rows"] == 0 and stats["store_quarantined"] == 0


def test_sigkill_during_writes_keeps_the_store_sound(home, daemons):
    """Five SIGKILLs at random moments while four clients make plans (two planners store them
    at once): after each, PRAGMA integrity_check passes, every plan that was answered is
    stored, and the restarted daemon serves what was committed and re-plans the rest."""
    rng = random.Random(1121)
    # the tuner's writes stay out of the way of the checks, which each restart runs alone
    home.env["HYPATIA_BACKGROUND_TUNING"] = "0"
    store_path = home.config.store_path
    asked: list[dict] = []
    stored: set[tuple[str, str, str]] = set()
    answered_total = 0
    for round_ in range(5):
        daemons.start()
        if asked:
            check_restarted_daemon(home, asked, stored)
        bodies = [linear_relu_request(batch, 8 + round_) for batch in range(1, 13)]
        replied: dict = {}
        errors: list[str] = []
        workers = drive_make_plans(home, bodies, threads=4, replied=replied, errors=errors)
        assert wait_until(lambda: len(replied) >= 2, 60), "no plan was answered"
        time.sleep(rng.uniform(0.0, 1.0))
        kill(daemons.procs[-1])
        for w in workers:
            w.join(30)
            assert not w.is_alive()

        with contextlib.closing(sqlite3.connect(store_path)) as conn:  # recovers the WAL, as the next open does
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = stored_plan_keys(store_path)
        assert set(replied) <= stored  # an answered plan was committed before its answer left
        assert errors == []
        asked += bodies
        answered_total += len(replied)

    daemons.start()
    check_restarted_daemon(home, asked, stored)
    assert answered_total < len(asked)  # the kills did cut work short
    assert "database disk image is malformed" not in daemons.log()


# -- 64 concurrent clients ---------------------------------------------------------------------

def test_a_store_write_waits_for_another_writer(tmp_path):
    """A plan stored while another connection holds SQLite's write lock waits for it (as the
    daemon's planners and tuner do for each other) instead of failing: write transactions begin
    IMMEDIATE, where a deferred one that has read is refused at once with "database is locked"."""
    store = Store(tmp_path / "s.sqlite")
    body = linear_relu_request(2, 8)
    plan = plan_graph(CanonicalGraph.from_wire(body["graph"]), env=body["environment"])
    holding = threading.Event()

    def other_writer() -> None:
        with contextlib.closing(sqlite3.connect(store.path, isolation_level=None)) as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO workloads (key, inputs, created_at) VALUES ('w-other', '[]', 'now')")
            holding.set()
            time.sleep(1.0)
            conn.execute("COMMIT")

    writer = threading.Thread(target=other_writer)
    writer.start()
    try:
        assert holding.wait(10)
        store.put_plan(keys_of(body), body["graph"], body["workload"], body["environment"], plan, [])
    finally:
        writer.join()
        store.close()
    reopened = Store(tmp_path / "s.sqlite", readonly=True)
    assert reopened.counts()["plans"] == 1 and reopened.counts()["workloads"] == 2
    reopened.close()


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

    stats = daemon_stats(home)
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
    proc = daemons.start(faults="slow_plan=1.0", extra_env={"HYPATIA_BACKGROUND_TUNING": "0"})
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
            stats = daemon_stats(home)
            return stats["requests"].get("make_plan", 0) == 16 and stats["inflight"] == 8
        assert wait_until(all_in_flight, 90, interval=0.1), daemon_stats(home)
        os.kill(proc.pid, signal.SIGTERM)

        with connection(home, timeout_ms=10_000, retries=0) as late:  # intake is closed during the drain
            start = time.monotonic()
            with pytest.raises(DaemonUnavailable, match="SHUTTING_DOWN"):
                late.call("make_plan", linear_relu_request(9, 32))
            assert time.monotonic() - start < 5

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
