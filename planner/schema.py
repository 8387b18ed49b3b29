"""The store's schema, declared once per database: one migration per version, appended and never
edited.

SQLite builds its tables through sqlite-utils and keeps its version in ``PRAGMA user_version``;
PostgreSQL gets the same tables and columns from plain DDL and keeps its version in
``hypatia_schema``. :class:`~hypatia.planner.store.Store` runs the migrations a database lacks,
each in its own transaction. A test checks that both dialects end with the same schema.
"""

from __future__ import annotations

from typing import Callable

import sqlite_utils

TABLES = (
    "canonical_graphs", "implementations", "environments", "workloads", "benchmark_traces", "plans", "verdicts",
    "quarantine", "region_verdicts", "untunable", "artifacts",
)


def _migrate_1(db: sqlite_utils.Database) -> None:
    db["canonical_graphs"].create(
        {"key": str, "nodes": int, "ops": str, "graph": bytes, "created_at": str}, pk="key"
    )
    db["implementations"].create(
        {"id": str, "op": str, "backend": str, "signature": str, "target": str, "description": str},
        pk="id",
    )
    db["environments"].create(
        {"key": str, "device_type": str, "device_name": str, "details": str, "created_at": str}, pk="key"
    )
    db["workloads"].create({"key": str, "inputs": str, "created_at": str}, pk="key")
    db["benchmark_traces"].create(
        {
            "id": int,
            "graph_key": str,
            "workload_key": str,
            "env_key": str,
            "implementation_id": str,
            "region": int,
            "median_us": float,
            "spread_us": float,
            "repeats": int,
            "max_rel_error": float,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[
            ("graph_key", "canonical_graphs", "key"),
            ("workload_key", "workloads", "key"),
            ("env_key", "environments", "key"),
            ("implementation_id", "implementations", "id"),
        ],
    )
    db["plans"].create(
        {
            "graph_key": str,
            "workload_key": str,
            "env_key": str,
            "revision": int,
            "policy": str,
            "recipe": str,
            "checksum": str,
            "created_at": str,
            "updated_at": str,
        },
        pk=("graph_key", "workload_key", "env_key"),
        foreign_keys=[
            ("graph_key", "canonical_graphs", "key"),
            ("workload_key", "workloads", "key"),
            ("env_key", "environments", "key"),
        ],
    )


def _migrate_2(db: sqlite_utils.Database) -> None:
    # Strict validation's result per fused region: a failed region is dropped from the plan.
    db["verdicts"].create(
        {
            "graph_key": str,
            "workload_key": str,
            "env_key": str,
            "region": int,
            "rule": str,
            "kernel": str,
            "ok": int,
            "max_abs_err": float,
            "max_rel_err": float,
            "detail": str,
            "created_at": str,
        },
        pk=("graph_key", "workload_key", "env_key", "region"),
    )


def _migrate_3(db: sqlite_utils.Database) -> None:
    # The tuner: measured ceilings per environment, traces keyed by the region's structure (so
    # any graph containing the same region reuses them), and whether a plan was measured.
    db["environments"].add_column("ceilings", str)
    db["environments"].add_column("measured_at", str)
    for name, kind in (("region_key", str), ("rule", str), ("ok", int), ("detail", str)):
        db["benchmark_traces"].add_column(name, kind)
    db["benchmark_traces"].create_index(["env_key", "region_key", "implementation_id"])
    db["plans"].add_column("tuned", int, not_null_default=0)


def _migrate_4(db: sqlite_utils.Database) -> None:
    # Rows that failed verification are moved here (never served, kept for a post-mortem).
    db["quarantine"].create(
        {"id": int, "source": str, "row_key": str, "content": str, "reason": str, "created_at": str}, pk="id"
    )


def _migrate_5(db: sqlite_utils.Database) -> None:
    # Validation per region *structure* (the r1-... key) and environment: a region shape checked
    # once, in any graph, process or host sharing the store, is never checked again.
    db["region_verdicts"].create(
        {
            "env_key": str,
            "region_key": str,
            "implementation_id": str,
            "rule": str,
            "ok": int,
            "max_abs_err": float,
            "max_rel_err": float,
            "detail": str,
            "created_at": str,
        },
        pk=("env_key", "region_key", "implementation_id"),
    )


# -- schema 6: labels for people, and plans whose tuning failed -------------------------------
# The class of the module Dynamo compiled a graph from (the first one seen: two models with the
# same graph share it and its plans); shown by `hypatia-ctl plans`, never part of any key.
# A tuning that failed, died, ran out of time or exceeded its memory budget in an environment is
# never tried again there: a restarted daemon reads the untunable table instead of repeating it.
def _migrate_6(db: sqlite_utils.Database) -> None:
    db["canonical_graphs"].add_column("model", str)
    db["untunable"].create(
        {"graph_key": str, "workload_key": str, "env_key": str, "reason": str, "created_at": str},
        pk=("graph_key", "workload_key", "env_key"),
    )


_POSTGRES_6 = (
    "ALTER TABLE canonical_graphs ADD COLUMN model TEXT",
    "CREATE TABLE untunable (graph_key TEXT, workload_key TEXT, env_key TEXT, reason TEXT, created_at TEXT, "
    "PRIMARY KEY (graph_key, workload_key, env_key))",
)
# -- end of schema 6 ---------------------------------------------------------------------------


# -- schema 7: compiled code ------------------------------------------------------------------
# Inductor's cache artifacts for one graph, compiled once per host (or cluster) and served to
# every later process. ``key`` is the client's c1- key (plan keys, executor candidate, device
# index, compiler versions and settings, what Inductor was given); ``source_key`` names Dynamo's
# graph and inputs, so that a graph compiled straight from Dynamo's graph (``direct``) starts
# warm without being traced again.
# ``digest`` (sha256 of ``content``) is checked before an artifact is handed out; ``last_used``
# (seconds since the epoch) orders eviction past HYPATIA_COMPILED_CACHE_MB.
def _migrate_7(db: sqlite_utils.Database) -> None:
    db["artifacts"].create(
        {
            "key": str, "graph_key": str, "workload_key": str, "env_key": str, "candidate": str,
            "device_index": int, "source_key": str, "direct": int, "digest": str, "size": int,
            "content": bytes, "created_at": str, "last_used": float, "uses": int,
        },
        pk="key",
    )
    db["artifacts"].create_index(["source_key"])
    db["artifacts"].create_index(["last_used"])


_POSTGRES_7 = (
    "CREATE TABLE artifacts (key TEXT PRIMARY KEY, graph_key TEXT, workload_key TEXT, env_key TEXT, candidate TEXT, "
    "device_index INTEGER, source_key TEXT, direct INTEGER, digest TEXT, size INTEGER, "
    "content BYTEA, created_at TEXT, last_used DOUBLE PRECISION, uses INTEGER)",
    "CREATE INDEX idx_artifacts_source_key ON artifacts (source_key)",
    "CREATE INDEX idx_artifacts_last_used ON artifacts (last_used)",
)
# -- end of schema 7 ---------------------------------------------------------------------------


# Schema version N is reached by running MIGRATIONS[N - 1]; append, never edit.
MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (
    _migrate_1, _migrate_2, _migrate_3, _migrate_4, _migrate_5, _migrate_6, _migrate_7,
)
SCHEMA_VERSION = len(MIGRATIONS)

# The same versions on PostgreSQL, as DDL run in one transaction each: the same tables and
# columns, with PostgreSQL's types for SQLite's (BLOB -> BYTEA, FLOAT -> DOUBLE PRECISION).
_PG_KEYS = (
    "graph_key TEXT REFERENCES canonical_graphs (key), workload_key TEXT REFERENCES workloads (key), "
    "env_key TEXT REFERENCES environments (key)"
)
POSTGRES_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE canonical_graphs (key TEXT PRIMARY KEY, nodes INTEGER, ops TEXT, graph BYTEA, created_at TEXT)",
        "CREATE TABLE implementations (id TEXT PRIMARY KEY, op TEXT, backend TEXT, signature TEXT, target TEXT, "
        "description TEXT)",
        "CREATE TABLE environments (key TEXT PRIMARY KEY, device_type TEXT, device_name TEXT, details TEXT, "
        "created_at TEXT)",
        "CREATE TABLE workloads (key TEXT PRIMARY KEY, inputs TEXT, created_at TEXT)",
        f"CREATE TABLE benchmark_traces (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, {_PG_KEYS}, "
        "implementation_id TEXT REFERENCES implementations (id), region INTEGER, median_us DOUBLE PRECISION, "
        "spread_us DOUBLE PRECISION, repeats INTEGER, max_rel_error DOUBLE PRECISION, created_at TEXT)",
        f"CREATE TABLE plans ({_PG_KEYS}, revision INTEGER, policy TEXT, recipe TEXT, checksum TEXT, "
        "created_at TEXT, updated_at TEXT, PRIMARY KEY (graph_key, workload_key, env_key))",
    ),
    (
        "CREATE TABLE verdicts (graph_key TEXT, workload_key TEXT, env_key TEXT, region INTEGER, rule TEXT, "
        "kernel TEXT, ok INTEGER, max_abs_err DOUBLE PRECISION, max_rel_err DOUBLE PRECISION, detail TEXT, "
        "created_at TEXT, PRIMARY KEY (graph_key, workload_key, env_key, region))",
    ),
    (
        "ALTER TABLE environments ADD COLUMN ceilings TEXT, ADD COLUMN measured_at TEXT",
        "ALTER TABLE benchmark_traces ADD COLUMN region_key TEXT, ADD COLUMN rule TEXT, ADD COLUMN ok INTEGER, "
        "ADD COLUMN detail TEXT",
        "CREATE INDEX idx_benchmark_traces_env_key_region_key_implementation_id "
        "ON benchmark_traces (env_key, region_key, implementation_id)",
        "ALTER TABLE plans ADD COLUMN tuned INTEGER NOT NULL DEFAULT 0",
    ),
    (
        "CREATE TABLE quarantine (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, source TEXT, "
        "row_key TEXT, content TEXT, reason TEXT, created_at TEXT)",
    ),
    (
        "CREATE TABLE region_verdicts (env_key TEXT, region_key TEXT, implementation_id TEXT, rule TEXT, ok INTEGER, "
        "max_abs_err DOUBLE PRECISION, max_rel_err DOUBLE PRECISION, detail TEXT, created_at TEXT, "
        "PRIMARY KEY (env_key, region_key, implementation_id))",
    ),
    _POSTGRES_6,
    _POSTGRES_7,
)
assert len(POSTGRES_MIGRATIONS) == SCHEMA_VERSION, "every schema version needs its PostgreSQL migration"
