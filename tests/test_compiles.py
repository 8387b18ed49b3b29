"""Compiled code through a real hypatiad: one process compiles a graph while the others wait
(claims kept by heartbeats, taken over when they stop, released on failure), the daemon keeps
what it is sent only when it is sound, small enough and from this host's own user, stays under
its size limit, never serves damaged content, flushes it apart from the plans, and starts a
graph warm from Dynamo's graph when its plan chose the executor that compiled it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time

import pytest

from conftest import daemon_stats, wait_until
from hypatia.client.rpc import DaemonClient
from hypatia.config import load
from hypatia.planner.artifacts import digest_of
from hypatia.protocol import ErrorCode, RemoteError
from test_curve import listener, remote_host  # noqa: F401 - listener is a fixture used below
from test_daemon import tiny_plan_request

A, B, C = "host-a:101", "host-a:102", "host-b:103"  # holders: host and pid of three processes


def key(n: int, prefix: str = "c1-") -> str:
    return prefix + hashlib.sha256(f"{prefix}{n}".encode()).hexdigest()


SOURCE = key(1, "s1-")


def put_body(artifact_key: str, content: bytes, holder: str = A, **fields) -> dict:
    """A put_compiled body for ``content`` (fields override the defaults)."""
    return {"key": artifact_key, "holder": holder, "content": content, "digest": digest_of(content),
            "graph_key": "g1-graph", "workload_key": "w1-load", "env_key": "e1-env", "candidate": "inductor",
            "device_index": 0, "source_key": SOURCE, "direct": True} | fields


def ask(client: DaemonClient, artifact_key: str, holder: str, claim: bool = True) -> dict:
    return client.call("get_compiled", {"key": artifact_key, "holder": holder, "claim": claim})


def refused(client: DaemonClient, method: str, body: dict) -> RemoteError:
    with pytest.raises(RemoteError) as err:
        client.call(method, body)
    return err.value


def start(home, **settings: str):
    """``home`` with a real hypatiad started with ``settings`` (background tuning off, a heartbeat of 1 s)."""
    home.env |= {"HYPATIA_BACKGROUND_TUNING": "0", "HYPATIA_COMPILE_HEARTBEAT_S": "1"} | settings
    assert "started" in home.hypatiad("start").stdout
    return home


@contextlib.contextmanager
def clients(config, n: int = 2):
    """``n`` connections to the daemon, as ``n`` processes would have."""
    opened = [DaemonClient(config, timeout_ms=20_000, retries=0) for _ in range(n)]
    try:
        yield opened
    finally:
        for c in opened:
            c.close()


def artifacts(home) -> dict:
    return daemon_stats(home.config)["artifacts"]


def counted(stats: dict, names: str) -> tuple:
    """The counters ``names`` (space separated) of the daemon's artifacts stats, in that order."""
    return tuple(stats[name] for name in names.split())


def rows(home) -> dict[str, tuple]:
    """The daemon's artifact rows (read beside it, as hypatia-ctl does): key -> (size, uses, candidate)."""
    with contextlib.closing(sqlite3.connect(f"file:{home.config.store_path}?mode=ro", uri=True)) as db:
        return {k: (size, uses, candidate)
                for k, size, uses, candidate in db.execute("SELECT key, size, uses, candidate FROM artifacts")}


# -- single flight -------------------------------------------------------------------------------


def test_one_process_compiles_and_the_others_wait_then_load_it(home):
    start(home)
    k, content = key(1), os.urandom(4096)
    with clients(home.config, 3) as (a, b, c):
        assert ask(a, k, A) == {"compile": True, "heartbeat_s": 1}
        assert ask(b, k, B) == {"wait": True, "holder": A, "retry_ms": 250}
        assert ask(c, k, C, claim=False) == {}  # a plain look-up is a miss, and never a claim
        assert artifacts(home)["compiling"] == 1
        assert a.call("put_compiled", put_body(k, content)) == {"stored": True, "evicted": 0}
        served = {"artifact": {"content": content, "digest": digest_of(content), "candidate": "inductor"}}
        assert ask(b, k, B) == served
        assert ask(c, k, C) == served
    stats = artifacts(home)
    assert counted(stats, "compiles_granted waits stored hits misses") == (1, 1, 1, 2, 3)
    assert counted(stats, "count bytes compiling takeovers refused") == (1, 4096, 0, 0, 0)
    assert rows(home) == {k: (4096, 2, "inductor")}


def test_a_claim_kept_by_heartbeats_is_waited_for_and_taken_over_when_they_stop(home):
    start(home)  # a heartbeat of 1 s: a claim silent for 3 s is taken over
    k = key(1)
    with clients(home.config, 3) as (a, b, c):
        assert ask(a, k, A)["compile"] is True
        waits, until = 0, time.monotonic() + 4.0
        while time.monotonic() < until:  # longer than the 3 s a silent claim lasts
            assert a.call("compile_heartbeat", {"holder": A, "keys": [k, key(2)]}) == {"held": [k]}
            assert ask(b, k, B)["holder"] == A
            waits += 1
            time.sleep(0.5)
        assert artifacts(home)["takeovers"] == 0
        # A stops beating (its process died): within three heartbeats B is told to compile
        replies: list[dict] = []
        assert wait_until(lambda: replies.append(ask(b, k, B)) or "compile" in replies[-1], timeout=60, interval=0.25)
        assert all(r["holder"] == A for r in replies[:-1])
        assert a.call("compile_heartbeat", {"holder": A, "keys": [k]}) == {"held": []}  # A lost it
        assert b.call("compile_heartbeat", {"holder": B, "keys": [k]}) == {"held": [k]}
        assert ask(c, k, C)["holder"] == B
        a.call("compile_release", {"key": k, "holder": A})  # not A's any more: nothing happens
        assert ask(c, k, C)["holder"] == B
    stats = artifacts(home)
    assert counted(stats, "takeovers compiles_granted released compiling") == (1, 2, 0, 1)
    assert stats["waits"] == waits + len(replies) - 1 + 2


def test_a_released_compile_goes_to_the_next_process_that_asks(home):
    start(home)
    k = key(1)
    with clients(home.config) as (a, b):
        assert ask(a, k, A)["compile"] is True
        assert ask(b, k, B)["wait"] is True
        assert b.call("compile_release", {"key": k, "holder": B}) == {}  # only the holder can release
        assert ask(b, k, B)["wait"] is True
        assert a.call("compile_release", {"key": k, "holder": A}) == {}
        assert ask(b, k, B) == {"compile": True, "heartbeat_s": 1}
        assert a.call("compile_release", {"key": key(2), "holder": A}) == {}  # no claim at all: nothing happens
    stats = artifacts(home)
    assert counted(stats, "released compiles_granted waits takeovers") == (1, 2, 2, 0)
    assert stats["compiling"] == 1 and stats["count"] == 0


# -- what the daemon keeps ------------------------------------------------------------------------


def test_damaged_oversized_and_malformed_puts_are_refused_and_nothing_is_stored(home):
    start(home, HYPATIA_COMPILED_ENTRY_MB="1")
    k, content = key(1), os.urandom(1000)
    with clients(home.config, 2) as (a, b):
        assert ask(a, k, A)["compile"] is True and ask(b, k, B)["wait"] is True
        err = refused(a, "put_compiled", put_body(k, content) | {"digest": digest_of(content[:-1])})
        assert err.code == ErrorCode.BAD_REQUEST and "does not match its digest" in err.remote_message
        assert ask(b, k, B)["compile"] is True  # nothing was stored: the next process compiles at once
        big = os.urandom(2 << 20)
        err = refused(b, "put_compiled", put_body(k, big, holder=B))
        assert err.code == ErrorCode.TOO_LARGE and "HYPATIA_COMPILED_ENTRY_MB" in err.remote_message
        assert ask(a, k, A)["compile"] is True
        malformed = {
            "key too short": {"key": "c1-" + "0" * 63}, "key prefix": {"key": "c2-" + "0" * 64},
            "key not hex": {"key": "c1-" + "g" * 64}, "key upper case": {"key": "c1-" + "A" * 64},
            "key not text": {"key": 7}, "digest": {"digest": "sha256:" + digest_of(content)},
            "source key": {"source_key": "s1-abc"}, "candidate": {"candidate": "tensorrt"},
            "candidate suffix": {"candidate": "inductor+graphs"}, "no candidate": {"candidate": ""},
            "device index": {"device_index": -1}, "direct": {"direct": 1}, "content": {"content": "text"},
            "holder": {"holder": "h" * 300},
        }
        for name, fields in malformed.items():
            err = refused(a, "put_compiled", put_body(k, content) | fields)
            assert err.code == ErrorCode.BAD_REQUEST, name
        for method, body in (("get_compiled", {"key": "c1-short", "holder": A}),
                             ("get_compiled", {"key": k}),
                             ("compile_heartbeat", {"holder": A, "keys": k}),
                             ("compile_heartbeat", {"holder": A, "keys": [k] * 257}),
                             ("compile_release", {"key": k.upper(), "holder": A}),
                             ("warm_start", {"source_key": "s1-x", "env_key": "e1-env", "device_index": 0}),
                             ("warm_start", {"source_key": SOURCE, "env_key": "e1-env", "device_index": "0"})):
            assert refused(a, method, body).code == ErrorCode.BAD_REQUEST, (method, body)
        assert ask(a, k, A, claim=False) == {}
        assert a.call("put_compiled", put_body(k, content)) == {"stored": True, "evicted": 0}  # a sound one is kept
    stats = artifacts(home)
    assert counted(stats, "refused stored count bytes") == (2, 1, 1, 1000)
    assert counted(stats, "compiles_granted waits takeovers compiling") == (3, 1, 0, 0)
    assert rows(home) == {k: (1000, 0, "inductor")}
    assert daemon_stats(home.config)["errors"]["BAD_REQUEST"] == 1 + len(malformed) + 7


def test_over_tcp_artifacts_are_served_but_never_accepted_nor_compiled_for_others(home, listener):
    endpoint, bundle = listener
    k, content = key(1), os.urandom(2048)
    remote = DaemonClient(load(home.env | remote_host(bundle, endpoint)), timeout_ms=20_000, retries=0)
    try:
        with clients(home.config, 1) as (local,):
            assert local.call("put_compiled", put_body(k, content))["stored"] is True
            err = refused(remote, "put_compiled", put_body(key(2), content, holder=C))
            assert err.code == ErrorCode.BAD_REQUEST and "this host's own user" in err.remote_message
            assert ask(remote, k, C) == {"artifact": {"content": content, "digest": digest_of(content),
                                                      "candidate": "inductor"}}
            # another host cannot share what it compiles: it is never given a claim that local
            # processes would wait on, but it may wait for a local compile and load its result
            assert ask(remote, key(2), C) == {}
            assert ask(local, key(2), A)["compile"] is True
            assert ask(remote, key(2), C)["holder"] == A
    finally:
        remote.close()
    stats = artifacts(home)
    assert counted(stats, "refused stored hits count compiles_granted") == (1, 1, 1, 1, 1)
    assert rows(home) == {k: (2048, 1, "inductor")}


def test_past_the_cache_limit_the_least_recently_used_are_evicted(home):
    start(home, HYPATIA_COMPILED_CACHE_MB="1")
    size, limit = 300 << 10, 1 << 20
    contents = {n: os.urandom(size) for n in range(1, 7)}
    with clients(home.config, 1) as (a,):
        for n in (1, 2, 3):
            assert a.call("put_compiled", put_body(key(n), contents[n])) == {"stored": True, "evicted": 0}
        assert ask(a, key(1), A)["artifact"]["content"] == contents[1]  # 1 used: 2 is now the oldest
        assert a.call("put_compiled", put_body(key(4), contents[4])) == {"stored": True, "evicted": 1}
        assert ask(a, key(2), A, claim=False) == {}
        assert a.call("put_compiled", put_body(key(5), contents[5])) == {"stored": True, "evicted": 1}  # 3 goes
        assert ask(a, key(1), A)["artifact"]["digest"] == digest_of(contents[1])
        assert a.call("put_compiled", put_body(key(6), contents[6])) == {"stored": True, "evicted": 1}  # 4 goes
        stats = artifacts(home)
        assert stats["count"] == 3 and stats["bytes"] == 3 * size <= stats["limit_bytes"] == limit
        assert counted(stats, "evicted stored hits") == (3, 6, 2)
        assert set(rows(home)) == {key(1), key(5), key(6)}
        for n in (1, 5, 6):
            assert ask(a, key(n), A)["artifact"]["content"] == contents[n]


def test_a_damaged_artifact_is_a_miss_quarantined_and_never_served(home):
    start(home)
    k, content = key(1), os.urandom(8192)
    with clients(home.config, 1) as (a,):
        assert a.call("put_compiled", put_body(k, content))["stored"] is True
        assert a.call("put_compiled", put_body(key(2), content[:100]))["stored"] is True
    home.hypatiad("stop")
    with contextlib.closing(sqlite3.connect(home.config.store_path)) as db:
        damaged = bytearray(content)
        damaged[4000] ^= 0xFF  # one flipped byte, the length unchanged
        db.execute("UPDATE artifacts SET content = ? WHERE key = ?", (bytes(damaged), k))
        db.commit()
    assert "started" in home.hypatiad("start").stdout
    with clients(home.config, 1) as (a,):
        assert ask(a, k, A) == {"compile": True, "heartbeat_s": 1}  # a miss: this process compiles it again
        assert ask(a, k, B, claim=False) == {}
        stats = artifacts(home)
        assert counted(stats, "quarantined hits misses count") == (1, 0, 2, 1)
        assert ask(a, key(2), B)["artifact"]["content"] == content[:100]  # the others serve on
        with contextlib.closing(sqlite3.connect(f"file:{home.config.store_path}?mode=ro", uri=True)) as db:
            ((source, row_key),) = db.execute("SELECT source, row_key FROM quarantine").fetchall()
        assert source == "artifacts" and k in row_key
        assert set(rows(home)) == {key(2)}
        assert a.call("put_compiled", put_body(k, content))["stored"] is True  # compiled again: served again
        assert ask(a, k, B)["artifact"]["content"] == content
    assert artifacts(home)["quarantined"] == 1


# -- flush, warm start and stats ------------------------------------------------------------------


def test_flush_of_artifacts_keeps_the_plans_and_a_full_flush_deletes_both(home):
    start(home)
    with clients(home.config) as (a, b):
        assert "regions" in a.call("make_plan", tiny_plan_request())["plan"]
        for n in (1, 2):
            assert a.call("put_compiled", put_body(key(n), os.urandom(100)))["stored"] is True
        assert ask(a, key(3), A)["compile"] is True
        err = refused(a, "flush", {"what": "nonsense"})
        assert err.code == ErrorCode.BAD_REQUEST and "nonsense" in err.remote_message
        assert artifacts(home)["count"] == 2 and daemon_stats(home.config)["plans"] == 1

        out = home.ctl("flush", "--artifacts", "--yes").stdout
        assert out.strip() == "flushed: 2 artifacts"
        stats = daemon_stats(home.config)
        assert counted(stats["artifacts"], "count compiling") + counted(stats, "plans graphs") == (0, 0, 1, 1)
        assert ask(b, key(1), B, claim=False) == {}
        assert ask(b, key(3), B)["compile"] is True  # the claims went with the artifacts

        assert a.call("put_compiled", put_body(key(1), os.urandom(100)))["stored"] is True
        out = home.ctl("flush", "--yes").stdout
        assert "1 artifacts" in out and "1 plans" in out
        stats = daemon_stats(home.config)
        assert counted(stats["artifacts"], "count compiling") + counted(stats, "plans graphs") == (0, 0, 0, 0)
        assert a.call("put_compiled", put_body(key(1), os.urandom(100)))["stored"] is True
    home.hypatiad("stop")  # with no daemon, hypatia-ctl flushes the artifacts in the store itself
    assert home.ctl("flush", "--artifacts", "--yes").stdout.strip() == "flushed: 1 artifacts"
    assert rows(home) == {}


def test_warm_start_serves_the_artifact_of_the_executor_its_plan_chose(home):
    start(home)
    request = tiny_plan_request()
    keys = {name: request[name] for name in ("graph_key", "workload_key", "env_key")}
    where = {"source_key": SOURCE, "env_key": keys["env_key"], "device_index": 0}
    content = os.urandom(3000)
    with clients(home.config, 1) as (a,):
        plan = a.call("make_plan", request)["plan"]
        assert plan["executor"] is None and plan["regions"] == []  # Inductor is given Dynamo's graph
        direct = put_body(key(1), content, **keys)
        assert a.call("put_compiled", direct)["stored"] is True
        assert a.call("put_compiled", put_body(key(2), content, **keys, direct=False))["stored"] is True
        assert a.call("put_compiled", put_body(key(3), content, **keys, candidate="aten+cudagraphs",
                                               source_key=key(2, "s1-")))["stored"] is True

        assert a.call("warm_start", where) == {}  # no executor measured, none forced: nothing to start from
        assert a.call("warm_start", where | {"candidate": "aten"}) == {}
        forced = a.call("warm_start", where | {"candidate": "inductor"})
        assert forced["artifact"] == {"content": content, "digest": digest_of(content), "candidate": "inductor"}
        assert forced["candidate"] == "inductor" and forced["keys"] == list(keys.values())
        assert forced["plan"]["revision"] == plan["revision"]

        def choose(chosen: str, revision: int) -> dict:
            times = [{"name": "inductor", "median_us": 10.0}, {"name": "aten", "median_us": 20.0}]
            return a.call("report", keys | {"pid": 1, "executor": {"revision": revision, "chosen": chosen,
                                                                   "training": False, "times": times}})["plan"]

        revised = choose("inductor", plan["revision"])
        chosen = a.call("warm_start", where)
        assert chosen["candidate"] == "inductor" and chosen["artifact"]["content"] == content
        assert chosen["plan"]["executor"]["chosen"] == "inductor"
        assert chosen["plan"]["revision"] == revised["revision"] == plan["revision"] + 1
        assert a.call("warm_start", where | {"device_index": 1}) == {}
        assert a.call("warm_start", where | {"env_key": "e1-other"}) == {}
        assert a.call("warm_start", where | {"source_key": key(3, "s1-")}) == {}
        other = a.call("warm_start", where | {"source_key": key(2, "s1-"), "candidate": "aten+cudagraphs"})
        assert other["candidate"] == "aten+cudagraphs"  # forced: whatever the plan chose

        choose("aten", revised["revision"])  # measured again: aten is faster now
        assert a.call("warm_start", where) == {}
        assert a.call("warm_start", where | {"candidate": "inductor"})["candidate"] == "inductor"
    stats = artifacts(home)
    assert counted(stats, "warm_hits warm_misses hits") == (4, 6, 4)
    assert rows(home)[key(1)] == (3000, 3, "inductor")


def test_stats_show_the_compiled_code(home):
    start(home)
    with clients(home.config, 1) as (a,):
        for n in (1, 2):
            assert a.call("put_compiled", put_body(key(n), bytes(2048)))["stored"] is True
        assert "artifact" in ask(a, key(1), A)
        assert ask(a, key(3), A)["compile"] is True
    lines = {line.split("  ")[0]: line for line in home.ctl("stats").stdout.splitlines()}
    shown = "2 artifacts, 4.0 KiB of 4.0 GiB; 1 served, 2 stored, 0 evicted, 0 quarantined, 1 compiling"
    assert shown in lines["compiled code"]
    full = home.ctl("stats", "--all").stdout
    assert "1 compiled by one process for all, 0 asks told to wait for another's compile, 0 taken over" in full
    home.hypatiad("stop")
    lines = {line.split("  ")[0]: line for line in home.ctl("stats").stdout.splitlines()}
    assert lines["compiled code"].endswith("  2 artifacts, 4.0 KiB")  # read from the store
