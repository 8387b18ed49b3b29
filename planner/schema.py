"""The store's schema, declared once: one migration per version, appended and never edited.

``PRAGMA user_version`` holds the version a database is at; :class:`~hypatia.planner.store.Store`
runs the migrations it lacks, each in its own transaction.
"""

from __future__ import annotations

from typing import Callable

import sqlite_utils

TABLES = ("canonical_graphs", "implementations", "environments", "workloads", "benchmark_traces", "plans", "verdicts")


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


# Schema version N is reached by running MIGRATIONS[N - 1]; append, never edit.
MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_migrate_1, _migrate_2, _migrate_3)
SCHEMA_VERSION = len(MIGRATIONS)
