"""Compiled code in the store (schema 7), on SQLite and on PostgreSQL: artifacts round trip, stay
under their size limit by evicting the least recently used, are refused when their content is
not their digest, and are quarantined, never served, when their stored content is damaged."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest

from hypatia.planner.artifacts import Artifact, digest_of
from hypatia.planner.store import SCHEMA_VERSION, TABLES, Store
from test_store import put, sample


def key(n: int, prefix: str = "c1-") -> str:
    return prefix + hashlib.sha256(f"{prefix}{n}".encode()).hexdigest()


SOURCE = key(1, "s1-")


def artifact(n: int, content: bytes, source: str = SOURCE, env: str = "e1-env", device: int = 0,
             direct: bool = True, candidate: str = "inductor") -> Artifact:
    return Artifact(key=key(n), graph_key="g1-graph", workload_key="w1-load", env_key=env, candidate=candidate,
                    device_index=device, source_key=source, direct=direct, digest=digest_of(content),
                    size=len(content))


def content_of(n: int, size: int = 1000) -> bytes:
    return bytes([n % 251]) * size


def keys_stored(store: Store) -> set[str]:
    return {k for (k,) in store.query("SELECT key FROM artifacts")}


def set_content(location, artifact_key: str, content: bytes | None) -> None:
    """Write other bytes into an artifact's row behind the store's back, as a damaged page would."""
    if isinstance(location, str):
        import psycopg

        with psycopg.connect(location, autocommit=True) as conn:
            conn.execute("UPDATE artifacts SET content = %s WHERE key = %s", (content, artifact_key))
    else:
        with sqlite3.connect(location) as conn:
            conn.execute("UPDATE artifacts SET content = ? WHERE key = ?", (content, artifact_key))
        conn.close()


LIMIT = 1 << 30


def test_an_artifact_round_trips_and_a_second_put_replaces_it(store_location):
    store = Store(store_location)
    assert store.get_artifact(key(1)) is None
    first, content = artifact(1, content_of(1)), content_of(1)
    assert store.put_artifact(first, content, LIMIT) == 0
    got, data = store.get_artifact(first.key)
    assert got == first and data == content and isinstance(data, bytes)
    assert store.artifact_totals() == (1, 1000)

    replacement = content_of(2, 1500)
    second = artifact(1, replacement, candidate="inductor+cudagraphs", device=3)
    assert store.put_artifact(second, replacement, LIMIT) == 0
    got, data = store.get_artifact(first.key)
    assert got == second and data == replacement
    assert store.artifact_totals() == (1, 1500)
    assert store.counts()["artifacts"] == 1
    assert store.counters["artifacts_evicted"] == 0

    reopened = Store(store_location, readonly=True)
    assert reopened.get_artifact(first.key) == (second, replacement)
    reopened.close()
    store.close()


def test_past_the_limit_the_least_recently_used_go_first(store_location):
    store = Store(store_location)
    limit = 3000
    for n in (1, 2, 3):
        assert store.put_artifact(artifact(n, content_of(n)), content_of(n), limit) == 0
    assert store.artifact_totals() == (3, 3000)  # at the limit is within it
    store.touch_artifact(key(1))  # 1 was used after 2 and 3 were stored: 2 is now the oldest
    assert store.query("SELECT uses FROM artifacts WHERE key = ?", (key(1),)) == [(1,)]

    assert store.put_artifact(artifact(4, content_of(4)), content_of(4), limit) == 1
    assert keys_stored(store) == {key(1), key(3), key(4)}
    assert store.counters["artifacts_evicted"] == 1

    store.touch_artifact(key(3))  # the order of use is now 1, 4, 3 (3 the most recent)
    assert store.put_artifact(artifact(5, content_of(5, 1500)), content_of(5, 1500), limit) == 2
    assert keys_stored(store) == {key(3), key(5)}
    assert store.artifact_totals() == (2, 2500)
    assert store.counters["artifacts_evicted"] == 3

    # the newest stays even alone over the limit: it was just asked for
    big = content_of(6, 5000)
    assert store.put_artifact(artifact(6, big), big, limit) == 2
    assert keys_stored(store) == {key(6)}
    assert store.artifact_totals() == (1, 5000)
    assert store.get_artifact(key(6))[1] == big
    assert store.counters["artifacts_evicted"] == 5
    store.close()


def test_content_that_is_not_its_digest_or_size_is_refused(store_location):
    store = Store(store_location)
    content = content_of(1)
    wrong_digest = artifact(1, content_of(2))  # the digest and size of other bytes
    with pytest.raises(ValueError, match="does not match"):
        store.put_artifact(wrong_digest, content, LIMIT)
    wrong_size = Artifact(**(artifact(1, content).row() | {"direct": True, "size": 999}))
    with pytest.raises(ValueError, match="does not match"):
        store.put_artifact(wrong_size, content, LIMIT)
    assert store.get_artifact(key(1)) is None
    assert store.artifact_totals() == (0, 0)
    assert store.counts()["artifacts"] == 0
    store.close()


@pytest.mark.parametrize("damage", ["other bytes", "truncated", "missing"])
def test_a_damaged_artifact_is_quarantined_and_never_served(store_location, damage):
    store = Store(store_location)
    content = bytes(range(256)) * 4
    stored = artifact(1, content)
    store.put_artifact(stored, content, LIMIT)
    healthy = artifact(2, content_of(2))
    store.put_artifact(healthy, content_of(2), LIMIT)
    damaged = {"other bytes": content[:100] + b"\x00" + content[101:], "truncated": content[:-24],
               "missing": None}[damage]
    assert damaged is None or (damaged != content and len(damaged) <= len(content))
    set_content(store_location, stored.key, damaged)

    assert store.get_artifact(stored.key) is None
    assert store.counters["artifacts_quarantined"] == 1
    assert store.counters["quarantined_rows"] == store.counters["corrupt_rows"] == 1
    assert keys_stored(store) == {healthy.key}
    ((source, row_key, row, reason),) = store.query("SELECT source, row_key, content, reason FROM quarantine")
    assert source == "artifacts" and json.loads(row_key) == stored.key
    assert json.loads(row)["digest"] == stored.digest
    assert "does not match the stored digest" in reason
    assert store.get_artifact(stored.key) is None  # still a miss, and not quarantined twice
    assert store.counters["artifacts_quarantined"] == 1
    assert store.counts()["quarantine"] == 1
    assert store.get_artifact(healthy.key) == (healthy, content_of(2))  # the others serve on

    store.put_artifact(stored, content, LIMIT)  # compiled again: served again
    assert store.get_artifact(stored.key) == (stored, content)
    store.close()


def test_direct_artifacts_are_found_by_source_environment_and_device(store_location):
    store = Store(store_location)
    other = key(2, "s1-")
    rows = {
        1: artifact(1, content_of(1)),
        2: artifact(2, content_of(2), candidate="inductor+cudagraphs"),
        3: artifact(3, content_of(3), source=other),
        4: artifact(4, content_of(4), env="e1-other"),
        5: artifact(5, content_of(5), device=1),
        6: artifact(6, content_of(6), direct=False),
        7: artifact(7, content_of(7), source=""),
    }
    for n, a in rows.items():
        store.put_artifact(a, content_of(n), LIMIT)
    store.touch_artifact(key(1))  # the most recently used first
    assert store.direct_artifacts(SOURCE, "e1-env", 0) == [rows[1], rows[2]]
    assert store.direct_artifacts(other, "e1-env", 0) == [rows[3]]
    assert store.direct_artifacts(SOURCE, "e1-other", 0) == [rows[4]]
    assert store.direct_artifacts(SOURCE, "e1-env", 1) == [rows[5]]
    assert store.direct_artifacts(SOURCE, "e1-env", 2) == []
    assert store.direct_artifacts(key(3, "s1-"), "e1-env", 0) == []
    assert store.artifact_totals() == (7, 7000)
    store.close()


def test_flushing_artifacts_keeps_the_plans_and_a_full_flush_deletes_both(store_location):
    store = Store(store_location)
    assert store.artifact_totals() == (0, 0)
    assert store.flush_artifacts() == 0
    graph, keys, env = sample()
    put(store, graph, keys, env)
    for n in (1, 2, 3):
        store.put_artifact(artifact(n, content_of(n, 100 * n)), content_of(n, 100 * n), LIMIT)
    assert store.artifact_totals() == (3, 600)

    assert store.flush_artifacts() == 3
    assert store.artifact_totals() == (0, 0)
    assert store.get_artifact(key(1)) is None
    assert store.get_plan(keys) is not None
    counts = store.counts()
    assert counts["artifacts"] == 0 and counts["plans"] == counts["canonical_graphs"] == 1

    store.put_artifact(artifact(1, content_of(1)), content_of(1), LIMIT)
    deleted = store.flush()
    assert deleted["artifacts"] == 1 and deleted["plans"] == 1
    assert store.counts() == {t: 0 for t in TABLES}
    assert store.get_artifact(key(1)) is None and store.get_plan(keys) is None
    store.close()


def test_a_version_6_store_migrates_to_an_empty_artifacts_table(tmp_path):
    import sqlite_utils

    from hypatia.planner import schema

    path = tmp_path / "six.sqlite"
    db = sqlite_utils.Database(sqlite3.connect(path))
    for migrate in schema.MIGRATIONS[:6]:
        migrate(db)
    db.execute("PRAGMA user_version = 6")
    db.conn.commit()
    assert "artifacts" not in db.table_names()
    db.conn.close()

    store = Store(path)
    assert store.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION == 7
    assert store.counts()["artifacts"] == 0 and store.artifact_totals() == (0, 0)
    columns = {row[1] for row in store.query("PRAGMA table_info(artifacts)")}
    assert columns == {"key", "graph_key", "workload_key", "env_key", "candidate", "device_index", "source_key",
                       "direct", "digest", "size", "content", "created_at", "last_used", "uses"}
    graph, keys, env = sample()
    put(store, graph, keys, env)
    store.put_artifact(artifact(1, content_of(1)), content_of(1), LIMIT)
    assert store.get_artifact(key(1)) == (artifact(1, content_of(1)), content_of(1))
    store.close()
