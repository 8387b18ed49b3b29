"""The plan store on SQLite and on PostgreSQL: schema and migrations, checksums, quarantine of bad
rows and of unreadable files."""

from __future__ import annotations

import json
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


def raw_execute(location, sql: str) -> None:
    """Change the database behind the store's back, as a damaged disk or a stray tool would."""
    if isinstance(location, str):
        import psycopg

        with psycopg.connect(location, autocommit=True) as conn:
            conn.execute(sql)
    else:
        with sqlite3.connect(location) as conn:
            conn.execute(sql)


def test_new_store_has_the_schema_in_wal(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    assert set(TABLES) <= set(store._db().db.table_names())
    assert store.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION
    assert store.query("PRAGMA journal_mode")[0][0] == "wal"
    assert store.counts() == {t: 0 for t in TABLES}


def test_plan_round_trip_and_rows(store_location):
    store = Store(store_location)
    assert store.counts() == {t: 0 for t in TABLES}
    graph, keys, env = sample()
    put(store, graph, keys, env)
    put(store, graph, keys, env)  # a second write of the same keys is an update, not a conflict
    plan = store.get_plan(keys)
    assert plan is not None and plan.graph_key == graph.key
    counts = store.counts()
    assert counts["plans"] == counts["canonical_graphs"] == counts["workloads"] == counts["environments"] == 1
    reopened = Store(store_location, readonly=True)
    assert reopened.get_plan(keys) == plan
    assert reopened.plan_rows()[0]["graph_key"] == graph.key
    assert store.get_job(keys)[0] == graph.to_wire()
    reopened.close()
    store.close()


def test_a_graph_keeps_the_first_model_label_and_its_plans_say_which_graph(store_location):
    """Schema 6: the model a graph came from is a label for people (the first one given wins;
    a graph stored without one takes the next), never a key; the graph's kind is its workload's."""
    store = Store(store_location)
    graph, keys, env = sample()
    plan = plan_graph(graph)
    store.put_plan(keys, graph.to_wire(), [META], env, plan, [])  # stored before labels existed
    assert [(r["model"], r["graph"]) for r in store.plan_rows()] == [(None, None)]
    training = [META, ["phase", "training", [0]]]
    trained = (keys[0], workload_key(training)[0], keys[2])
    store.put_plan(trained, graph.to_wire(), training, env, plan, [], model="TinyNet")
    inference = [META, ["phase", "inference", []]]
    served = (keys[0], workload_key(inference)[0], keys[2])
    store.put_plan(served, graph.to_wire(), inference, env, plan, [], model="OtherNet")
    rows = {r["workload_key"]: (r["model"], r["graph"]) for r in store.plan_rows()}
    assert rows == {keys[1]: ("TinyNet", None), trained[1]: ("TinyNet", "training"), served[1]: ("TinyNet", "inference")}
    assert store.counts()["canonical_graphs"] == 1
    store.close()


def test_corrupted_row_is_counted_quarantined_and_never_served(store_location):
    store = Store(store_location)
    graph, keys, env = sample()
    put(store, graph, keys, env)
    raw_execute(store_location, "UPDATE plans SET recipe = replace(recipe, 'HEURISTIC', 'HEURISTIX')")
    assert store.get_plan(keys) is None
    assert store.counters["corrupt_rows"] == store.counters["quarantined_rows"] == 1
    assert store.counts()["plans"] == 0
    ((source, row_key, content, reason),) = store.query("SELECT source, row_key, content, reason FROM quarantine")
    assert source == "plans" and json.loads(row_key) == list(keys)
    assert "HEURISTIX" in content and "checksum" in reason
    put(store, graph, keys, env)  # re-planned: the keys are served again
    assert store.get_plan(keys) is not None
    store.close()


def test_unreadable_file_is_moved_aside(tmp_path):
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    store = Store(path)
    assert store.counters["store_quarantined"] == 1
    assert list(tmp_path.glob("s.sqlite.corrupt-*"))
    assert store.counts()["plans"] == 0


def test_newer_schema_is_refused_not_misread(store_location):
    Store(store_location).close()
    if isinstance(store_location, str):
        raw_execute(store_location, f"UPDATE hypatia_schema SET version = {SCHEMA_VERSION + 1}")
    else:
        raw_execute(store_location, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer Hypatia"):
        Store(store_location)
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        Store(store_location, readonly=True)


def test_flush_empties_every_table_and_keeps_the_schema(store_location):
    store = Store(store_location)
    graph, keys, env = sample()
    put(store, graph, keys, env)
    deleted = store.flush()
    assert deleted["plans"] == 1 and deleted["canonical_graphs"] == 1
    assert store.counts() == {t: 0 for t in TABLES}
    put(store, graph, keys, env)
    assert store.get_plan(keys) is not None
    assert store.size_bytes() > 0
    store.close()


def test_an_untunable_plan_is_recorded_once_read_back_and_flushed(store_location):
    """Schema 6: a plan whose tuning failed is marked with the reason (the last one wins)."""
    store = Store(store_location)
    graph, keys, env = sample()
    put(store, graph, keys, env)
    assert store.untunable() == {}
    store.mark_untunable(keys, "first")
    store.mark_untunable(keys, "tuning needs about 9 GiB, over the budget")
    assert store.untunable() == {keys: "tuning needs about 9 GiB, over the budget"}
    assert store.counts()["untunable"] == 1
    store.flush()
    assert store.untunable() == {}
    store.close()


def test_a_version_2_store_migrates_and_its_format_1_plans_still_serve(tmp_path):
    """Schemas 3 (the tuner's columns) and 4 (quarantine) are added in place; plans written
    before them, in recipe format 1, are read as untuned plans whose regions run on the device."""
    import sqlite3

    import sqlite_utils

    from hypatia.planner import schema
    from hypatia.planner.plan import recipe_checksum

    path = tmp_path / "old.sqlite"
    db = sqlite_utils.Database(sqlite3.connect(path))
    for migrate in schema.MIGRATIONS[:2]:
        migrate(db)
    db.execute("PRAGMA user_version = 2")
    keys = ("g1-old", "w1-old", "e1-old")
    recipe = json.dumps({"format": 1, "graph_key": "g1-old", "policy": "HEURISTIC", "revision": 1, "validated": [],
                         "regions": [{"rule": "linear_relu", "kernel": "linear_activation/cpu_torch/relu",
                                      "inputs": [0, 1, 2], "consts": [None], "output": 4, "nodes": [3, 4]}]},
                        sort_keys=True, separators=(",", ":"))
    db["canonical_graphs"].insert({"key": keys[0], "nodes": 5, "ops": "{}", "graph": b"", "created_at": "t"})
    db["workloads"].insert({"key": keys[1], "inputs": "[]", "created_at": "t"})
    db["environments"].insert({"key": keys[2], "device_type": "cpu", "device_name": "x", "details": "{}", "created_at": "t"})
    db["plans"].insert({"graph_key": keys[0], "workload_key": keys[1], "env_key": keys[2], "revision": 1,
                        "policy": "HEURISTIC", "recipe": recipe, "checksum": recipe_checksum(keys, recipe),
                        "created_at": "t", "updated_at": "t"})
    db.conn.commit()
    db.conn.close()

    store = Store(path)
    assert store.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION == 7
    plan = store.get_plan(keys)
    assert plan is not None and not plan.tuned and plan.regions[0].placement == "device"
    assert [(r["tuned"], r["model"], r["graph"]) for r in store.plan_rows(untuned_only=True)] == [(False, None, None)]
    assert store.ceilings(keys[2]) is None and store.traces(keys[2], ["r1-x"]) == {}
    store.close()
