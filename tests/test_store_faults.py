"""Faults of the store under a real daemon: a truncated database file and SIGKILLs during writes
never leave it unsound or served; a write waits for another writer instead of failing."""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from conftest import daemon_stats, wait_until
from fault_helpers import (  # noqa: F401  (daemons: a fixture)
    compile_client,
    connection,
    daemons,
    key_body,
    keys_of,
    kill,
    linear_relu_request,
    stored_plan_keys,
)
from hypatia.canonical import CanonicalGraph
from hypatia.client.rpc import DaemonUnavailable
from hypatia.planner import plan_graph
from hypatia.planner.store import Store
from hypatia.protocol import RemoteError


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
    """The daemon starts on a truncated store file: the file is moved aside and counted, the
    plans it still gives (each verified) are kept, every other graph is planned again, and all
    run right."""
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
    stats = daemon_stats(home.config)
    assert stats["store_quarantined"] == 1 and stats["store"]["corruptions"] == 1
    salvaged = stats["plans"]  # what the cut file still gave: the first half, or its surviving WAL
    assert stats["store"]["rows_salvaged"] >= salvaged
    aside = [p.name for p in store_path.parent.iterdir() if p.name.startswith(f"{store_path.name}.corrupt-")]
    assert any(not name.endswith(("-wal", "-shm")) for name in aside), aside
    assert "is damaged" in daemons.log() and "found at open" in daemons.log()

    again, stderr = compile_client(home, widths)
    misses = again.get("daemon_misses", 0)
    assert again.get("daemon_hits", 0) + misses == 3, again
    assert "fallbacks" not in again and again["regions_fused"] == 3, stderr
    stats = daemon_stats(home.config)
    assert stats["plan_cache"]["plans_made"] == misses and stats["plans"] == salvaged + misses
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
