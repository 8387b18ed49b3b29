"""The SQLite store: schema and migrations, checksums, quarantine of unreadable files."""

from __future__ import annotations

import sqlite3

import pytest

from hypatia.canonical import RawNode, canonicalize, environment_key, workload_key
from hypatia.planner import plan_graph
from hypatia.planner.store import SCHEMA_VERSION, TABLES, Store, StoreError

META = ["T", [4, 8], [8, 1], "float32", "cpu"]


def sample():
    graph, _ = canonicalize(
        [RawNode("placeholder", [0], {}, META), RawNode("aten.relu.default", [["n", 0]], {}, META)], ["l", [["n", 1]]]
    )
    env = {"device_type": "cpu", "device_name": "test cpu"}
    keys = (graph.key, workload_key([META])[0], environment_key(env)[0])
    return graph, keys, env


def put(store, graph, keys, env):
    store.put_plan(keys, graph.to_wire(), [META], env, plan_graph(graph), [])


def test_new_store_has_the_schema_in_wal(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    assert set(TABLES) <= set(store._db().table_names())
    assert store.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION
    assert store.query("PRAGMA journal_mode")[0][0] == "wal"
    assert store.counts() == {t: 0 for t in TABLES}


def test_plan_round_trip_and_rows(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    graph, keys, env = sample()
    put(store, graph, keys, env)
    plan = store.get_plan(keys)
    assert plan is not None and plan.graph_key == graph.key
    counts = store.counts()
    assert counts["plans"] == counts["canonical_graphs"] == counts["workloads"] == counts["environments"] == 1
    reopened = Store(tmp_path / "s.sqlite", readonly=True)
    assert reopened.get_plan(keys) == plan


def test_corrupted_row_is_a_counted_miss_and_is_dropped(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    graph, keys, env = sample()
    put(store, graph, keys, env)
    with sqlite3.connect(tmp_path / "s.sqlite") as conn:
        conn.execute("UPDATE plans SET recipe = replace(recipe, 'HEURISTIC', 'HEURISTIX')")
    assert store.get_plan(keys) is None
    assert store.counters["corrupt_rows"] == 1
    assert store.counts()["plans"] == 0


def test_unreadable_file_is_moved_aside(tmp_path):
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    store = Store(path)
    assert store.counters["store_quarantined"] == 1
    assert list(tmp_path.glob("s.sqlite.corrupt-*"))
    assert store.counts()["plans"] == 0


def test_newer_schema_is_refused_not_misread(tmp_path):
    path = tmp_path / "s.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer Hypatia"):
        Store(path)
