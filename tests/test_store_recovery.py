"""The store when its file cannot be used as is: a full disk or a read-only file never costs the
cache (the file is served read-only and written again once it can be), and a file damaged under a
running daemon is moved aside, its readable rows kept, while the daemon goes on serving."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import daemon_stats
from fault_helpers import connection, daemons, key_body, keys_of, linear_relu_request  # noqa: F401 (daemons: a fixture)
from hypatia.canonical import CanonicalGraph
from hypatia.planner import plan_graph
from hypatia.planner.store import Store, UnreadableStore


def seed_store(path: Path, bodies: list[dict]) -> None:
    """A store holding one plan per request body (planned once: the bodies differ only in shapes)."""
    plan = plan_graph(CanonicalGraph.from_wire(bodies[0]["graph"]), env=bodies[0]["environment"])
    store = Store(path)
    try:
        for body in bodies:
            store.put_plan(keys_of(body), body["graph"], body["workload"], body["environment"],
                           dataclasses.replace(plan, graph_key=body["graph_key"]), [])
    finally:
        store.close()  # the last connection folds the WAL into the file


def damage_leaves(path: Path, table: str, every: int = 5) -> list[int]:
    """Overwrite every ``every``-th leaf page of ``table`` (never its last) with random bytes, as
    a failing disk or a stray writer would; returns the page numbers."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        leaves = [n for n, kind in conn.execute(
            "SELECT pageno, pagetype FROM dbstat WHERE name = ? ORDER BY pageno", (table,)) if kind == "leaf"]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    damaged = leaves[2:-1:every]
    assert len(damaged) >= 2, f"{table} has too few pages to damage: {leaves}"
    rng = random.Random(13)
    with open(path, "r+b") as f:
        for page in damaged:
            f.seek((page - 1) * page_size)
            f.write(rng.randbytes(page_size))
    return damaged


def readable_plan_keys(path: Path, rows: int) -> set[tuple[str, str, str]]:
    """The plans SQLite can still read from a damaged file (rowids 1 to ``rows``), asked one
    row at a time."""
    found = set()
    with contextlib.closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as conn:
        for rowid in range(1, rows + 1):
            try:
                row = conn.execute("SELECT graph_key, workload_key, env_key, recipe FROM plans WHERE rowid = ?",
                                   (rowid,)).fetchone()
            except sqlite3.DatabaseError:
                continue
            if row is not None:
                found.add(tuple(row[:3]))
    return found


def aside_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f"{path.name}.corrupt-"))


# -- damage found while running ------------------------------------------------------------------


def test_damage_seen_by_many_threads_is_repaired_once_and_readable_rows_kept(tmp_path):
    """Four threads read a store whose table pages were overwritten under them: one repair (one
    file moved aside), every plan that could still be read is served, the rest are misses, and
    the fresh store takes writes and survives a reopen."""
    path = tmp_path / "s.sqlite"
    bodies = [linear_relu_request(batch, 8) for batch in range(1, 81)]
    seed_store(path, bodies)
    store = Store(path)
    damage_leaves(path, "plans")
    readable = readable_plan_keys(path, len(bodies))
    assert 0 < len(readable) < len(bodies)

    served: dict = {}
    errors: list[BaseException] = []

    def look(share: list[dict]) -> None:
        try:
            for body in share:
                plan = store.get_plan(keys_of(body))
                served[keys_of(body)] = plan is not None and plan.graph_key == body["graph_key"]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=look, args=(bodies[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert {k for k, ok in served.items() if ok} == readable  # nothing lost that could be read
    health = store.health()
    assert (health["corruptions"], health["files_quarantined"]) == (1, 1)
    assert health["rows_salvaged"] >= len(readable)
    assert len([n for n in aside_files(path) if not n.endswith(("-wal", "-shm"))]) == 1

    lost = next(b for b in bodies if keys_of(b) not in readable)  # re-planned into the fresh store
    replanned = dataclasses.replace(store.get_plan(next(iter(readable))), graph_key=lost["graph_key"])
    store.put_plan(keys_of(lost), lost["graph"], lost["workload"], lost["environment"], replanned, [])
    store.close()
    reopened = Store(path, readonly=True)
    assert reopened.counts()["plans"] == len(readable) + 1
    assert reopened.get_plan(keys_of(lost)) is not None
    reopened.close()


def test_damage_under_a_running_daemon_is_repaired_and_it_keeps_serving(home, daemons):
    """Table pages of a running daemon's store are overwritten: the daemon answers every lookup
    (a hit for each plan still readable, a miss for the rest) and every new plan without an
    error, counts one damage and one file moved aside, logs one line and no traceback, and
    hypatia-ctl stats and plans work."""
    home.env["HYPATIA_BACKGROUND_TUNING"] = "0"
    store_path = home.config.store_path
    store_path.parent.mkdir(parents=True, exist_ok=True)
    bodies = [linear_relu_request(batch, 8) for batch in range(1, 49)]
    seed_store(store_path, bodies)
    daemons.start()
    damage_leaves(store_path, "plans", every=4)
    readable = readable_plan_keys(store_path, len(bodies))

    hits = set()
    with connection(home, timeout_ms=60_000, retries=0) as c:
        fresh = [linear_relu_request(batch, 12) for batch in (1, 2)]
        for body in fresh:  # writes: every connection of the daemon reads the file again
            assert c.call("make_plan", body)["plan"]["graph_key"] == body["graph_key"]
        for body in bodies:
            recipe = c.call("get_plan", key_body(body))["plan"]
            if recipe is not None:
                assert recipe["graph_key"] == body["graph_key"]
                hits.add(keys_of(body))
            else:
                assert c.call("make_plan", body)["plan"]["graph_key"] == body["graph_key"]
        assert all(c.call("get_plan", key_body(b))["plan"] is not None for b in bodies + fresh)
    assert hits == readable  # whatever could still be read, before the repair or after it

    stats = daemon_stats(home.config)
    assert stats["error_total"] == 0, stats["errors"]
    assert (stats["store"]["corruptions"], stats["store_quarantined"]) == (1, 1)
    assert stats["store"]["rows_salvaged"] > 0 and stats["store"]["writable"]
    assert stats["plans"] == len(bodies) + len(fresh)
    assert [n for n in aside_files(store_path) if not n.endswith(("-wal", "-shm"))]
    log = daemons.log()
    assert log.count("is damaged") == 1 and "Traceback" not in log and "malformed" in log

    shown = home.ctl("stats")
    assert "damaged: 1" in shown.stdout and "Traceback" not in shown.stderr
    listed = home.ctl("plans")
    assert len(listed.stdout.splitlines()) == 1 + len(bodies) + len(fresh) and listed.stderr == ""


# -- hypatia-ctl on a damaged store --------------------------------------------------------------


@pytest.mark.parametrize("damage", ["table pages overwritten", "not a database"])
def test_ctl_on_a_damaged_store_says_so_in_one_line(home, damage):
    """With no daemon running, every command that reads a damaged store prints one line saying
    what is wrong and what to do, and exits non-zero: never a traceback."""
    store_path = home.config.store_path
    store_path.parent.mkdir(parents=True, exist_ok=True)
    bodies = [linear_relu_request(batch, 8) for batch in range(1, 41)]
    seed_store(store_path, bodies)
    if damage == "not a database":
        store_path.write_bytes(b"\x00garbage" * 4096)
    else:
        damage_leaves(store_path, "plans", every=3)
    commands = [("plans",), ("plans", bodies[-1]["graph_key"][:12])]
    if damage == "not a database":  # (counting rows reads an index, which the overwritten pages spare)
        commands += [("stats",), ("stats", "--json")]
    for args in commands:
        proc = home.ctl(*args, check=False)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert "is damaged" in lines[0] and "hypatiad start" in lines[0], lines[0]
    with pytest.raises(UnreadableStore):
        Store(store_path, readonly=True).plan_rows()


# -- a full disk or a read-only file -------------------------------------------------------------


def test_a_store_that_fills_up_while_running_serves_read_only_then_writes_again(tmp_path):
    """SQLite answers "database or disk is full" (PRAGMA max_page_count is its own full disk):
    the write is dropped and counted, the file stays where it is and keeps serving, and the
    first write once there is room again is stored."""
    path = tmp_path / "s.sqlite"
    bodies = [linear_relu_request(batch, 8) for batch in range(1, 40)]
    seed_store(path, bodies[:3])
    store = Store(path, retry_s=0)
    db = store._db()
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")
    plan = store.get_plan(keys_of(bodies[0]))
    for body in bodies[3:]:
        store.put_plan(keys_of(body), body["graph"], body["workload"], body["environment"],
                       dataclasses.replace(plan, graph_key=body["graph_key"]), [])
        if not store.writable:
            break
    health = store.health()
    assert not health["writable"] and "disk is full" in health["problem"] and health["writes_dropped"] == 1
    assert store.get_plan(keys_of(bodies[1])) is not None  # still served
    assert aside_files(path) == [] and health["files_quarantined"] == 0

    db.execute("PRAGMA max_page_count = 1000000")  # room again
    last = bodies[-1]
    store.put_plan(keys_of(last), last["graph"], last["workload"], last["environment"],
                   dataclasses.replace(plan, graph_key=last["graph_key"]), [])
    assert store.writable and store.problem is None
    assert store.get_plan(keys_of(last)) is not None
    store.close()


@contextlib.contextmanager
def read_only(*paths: Path):
    """Make files and directories read-only for this process, root included (the immutable
    attribute; chmod does not stop root)."""
    if os.geteuid() != 0:
        modes = [(p, p.stat().st_mode) for p in paths]
        for p in paths:
            p.chmod(0o500 if p.is_dir() else 0o400)
        try:
            yield
        finally:
            for p, mode in modes:
                p.chmod(mode)
        return
    done = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make files read-only for root here (chattr +i: {done.stderr.strip()})")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


def test_a_read_only_store_at_open_is_served_never_moved_aside(tmp_path):
    """A store whose file and directory cannot be written opens read-only: its plans are served,
    writes are dropped and counted, nothing is moved aside; writable again, it takes writes."""
    folder = tmp_path / "cache"
    folder.mkdir()
    path = folder / "s.sqlite"
    bodies = [linear_relu_request(batch, 8) for batch in range(1, 5)]
    seed_store(path, bodies[:3])
    with read_only(path, folder):
        store = Store(path, retry_s=0)
        health = store.health()
        assert not health["writable"] and health["problem"]
        assert all(store.get_plan(keys_of(b)) is not None for b in bodies[:3])
        plan = store.get_plan(keys_of(bodies[0]))
        extra = bodies[3]
        store.put_plan(keys_of(extra), extra["graph"], extra["workload"], extra["environment"],
                       dataclasses.replace(plan, graph_key=extra["graph_key"]), [])
        assert store.health()["writes_dropped"] == 1 and store.counts()["plans"] == 3
        assert sorted(p.name for p in folder.iterdir()) == ["s.sqlite"]
    store.put_plan(keys_of(extra), extra["graph"], extra["workload"], extra["environment"],
                   dataclasses.replace(plan, graph_key=extra["graph_key"]), [])
    assert store.writable and store.counts()["plans"] == 4
    store.close()


def test_a_daemon_that_cannot_even_create_its_store_exits_with_a_message(home):
    """No store yet, in a cache directory where none can be created: hypatiad exits 2 saying what
    is wrong and what to do, without a traceback (and nothing is moved anywhere)."""
    cache = home.config.cache_dir
    cache.mkdir(parents=True)
    home.config.log_path.touch()
    with read_only(cache):
        proc = home.hypatiad("start", "--foreground", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hypatiad: cannot create the store") and "cannot be written" in last, last
    assert sorted(p.name for p in cache.iterdir()) == ["hypatiad.log"]


# The daemon on a real full file system: a tmpfs mounted over its cache directory in a private
# mount namespace, filled to the last byte; its log stays on the real disk (bound in over the
# tmpfs), so that it can be read and the full disk cannot silence it.
FULL_DISK = """
cache=$1 seed=$2; shift 2
exec 3>>"$cache/hypatiad.log"
mount -t tmpfs -o size=1m tmpfs "$cache"
cp "$seed" "$cache/hypatia.sqlite"
touch "$cache/hypatiad.log"
mount -c --bind /proc/self/fd/3 "$cache/hypatiad.log"
exec 3>&-
dd if=/dev/zero of="$cache/filler" bs=4k 2>/dev/null || true
exec "$@"
"""


def full_disk_wrapper(cache: Path, seed: Path) -> tuple[str, ...]:
    """``unshare`` running FULL_DISK: as root, or in a user namespace of its own where the kernel
    lets a user have one (skipped where neither may mount)."""
    tries = [("--mount",)] if os.geteuid() == 0 else []
    tries.append(("--mount", "--user", "--map-root-user"))
    said = []
    for options in tries:
        wrapper = ("unshare", *options, "sh", "-ec", FULL_DISK, "sh", str(cache), str(seed))
        probe = subprocess.run([*wrapper, "true"], capture_output=True, text=True)
        if probe.returncode == 0:
            return wrapper
        said.append(probe.stderr.strip())
    pytest.skip(f"cannot mount a small tmpfs in a private mount namespace here: {'; '.join(said)}")


def test_a_daemon_on_a_full_disk_serves_its_store_and_writes_once_space_is_back(home, daemons):
    """The cache directory is full when the daemon starts: the healthy store is never moved
    aside, its plans are hits, new plans are answered but not stored (counted, shown by
    hypatia-ctl stats), and once space is freed the next plan is stored."""
    home.env |= {"HYPATIA_BACKGROUND_TUNING": "0", "HYPATIA_STORE_RETRY_S": "0"}
    seed = home.path / "seed.sqlite"
    bodies = [linear_relu_request(batch, 8) for batch in range(1, 6)]
    seed_store(seed, bodies[:3])
    cache = home.config.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    home.config.log_path.touch()
    proc = daemons.start(wrapper=full_disk_wrapper(cache, seed))
    inside = Path(f"/proc/{proc.pid}/root{cache}")  # the cache directory as the daemon sees it

    stats = daemon_stats(home.config)
    assert not stats["store"]["writable"] and "disk is full" in stats["store"]["problem"], stats["store"]
    assert stats["plans"] == 3 and stats["store_quarantined"] == 0
    shown = home.ctl("stats").stdout
    assert "READ-ONLY: the disk is full" in shown
    with connection(home, timeout_ms=60_000, retries=0) as c:
        for body in bodies[:3]:
            assert c.call("get_plan", key_body(body))["plan"]["graph_key"] == body["graph_key"]
        assert c.call("make_plan", bodies[3])["plan"]["graph_key"] == bodies[3]["graph_key"]
        stats = c.call("stats")
        assert stats["store"]["writes_dropped"] >= 1 and stats["plans"] == 3
        assert stats["plan_cache"]["hits"] == 3 and stats["error_total"] == 0

        (inside / "filler").unlink()  # space is back
        assert c.call("make_plan", bodies[4])["plan"]["graph_key"] == bodies[4]["graph_key"]
        stats = c.call("stats")
    assert stats["store"]["writable"] and stats["store"]["problem"] is None
    assert stats["plans"] == 4 and stats["error_total"] == 0
    assert not [p for p in os.listdir(inside) if ".corrupt-" in p]
    log = daemons.log()
    # once per process that met the full disk: the daemon, and its planning worker
    assert 1 <= log.count("cannot be written") <= 2 and "writable again" in log and "Traceback" not in log
    home.hypatiad("stop")
    assert proc.wait(30) == 0
