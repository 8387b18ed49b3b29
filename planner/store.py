"""The plan store: one SQLite file through sqlite-utils, WAL, a schema version and migrations.

The daemon is the only writer. Each thread gets its own connection. A row whose checksum or
format does not verify is a miss: it is counted, removed and re-planned, never served.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import sqlite_utils

from hypatia.planner.plan import Plan, PlanFormatError, recipe_checksum, recipe_text
from hypatia.planner.schema import MIGRATIONS, SCHEMA_VERSION, TABLES

log = logging.getLogger("hypatia.store")



class StoreError(Exception):
    """The store cannot be opened or used as it is; the message says what to do."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Store:
    """The SQLite plan store at ``path``; ``readonly`` opens it for inspection only."""

    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self.counters: Counter = Counter()
        self._local = threading.local()
        if readonly:
            if not self.path.exists():
                raise StoreError(f"no store at {self.path} yet; it is created by the first plan")
            version = self._db().execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {version}, this Hypatia reads {SCHEMA_VERSION}; "
                    "start the daemon of this version to migrate it"
                )
        else:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._open_or_quarantine()

    # -- connections ----------------------------------------------------------------------
    def _connect(self) -> sqlite_utils.Database:
        if self.readonly:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10, check_same_thread=False)
        else:
            conn = sqlite3.connect(str(self.path), timeout=10, check_same_thread=False)
        db = sqlite_utils.Database(conn, execute_plugins=False)
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("PRAGMA foreign_keys = ON")
        return db

    def _db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    def _open_or_quarantine(self) -> None:
        try:
            self._migrate()
        except sqlite3.DatabaseError as exc:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            log.error("store %s is unreadable (%s); moved aside to %s and starting empty", self.path, exc, aside)
            self.close()
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    src.rename(Path(str(aside) + suffix))
            self.counters["store_quarantined"] += 1
            self._migrate()

    def _migrate(self) -> None:
        db = self._db()
        db.enable_wal()
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer Hypatia (schema {version} > {SCHEMA_VERSION}); "
                "upgrade Hypatia, or point HYPATIA_HOME elsewhere"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with db.atomic():
                MIGRATIONS[target - 1](db)
                db.execute(f"PRAGMA user_version = {target}")
            log.info("store %s migrated to schema %d", self.path, target)

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None

    # -- plans ----------------------------------------------------------------------------
    def get_plan(self, keys: tuple[str, str, str]) -> Plan | None:
        """The stored plan for (graph, workload, environment), or None (also for a bad row)."""
        db = self._db()
        row = db.execute(
            "SELECT recipe, checksum FROM plans WHERE graph_key = ? AND workload_key = ? AND env_key = ?",
            keys,
        ).fetchone()
        if row is None:
            return None
        text, checksum = row
        try:
            if not isinstance(text, str) or recipe_checksum(keys, text) != checksum:
                raise PlanFormatError("checksum does not match")
            plan = Plan.from_recipe(json.loads(text))
            if plan.graph_key != keys[0]:
                raise PlanFormatError("recipe names another graph")
            return plan
        except (PlanFormatError, ValueError) as exc:
            self.counters["corrupt_rows"] += 1
            log.error("plan row %s failed verification (%s); dropping it and re-planning", keys, exc)
            if not self.readonly:
                with db.atomic():
                    db.execute(
                        "DELETE FROM plans WHERE graph_key = ? AND workload_key = ? AND env_key = ?", keys
                    )
            return None

    def put_plan(
        self,
        keys: tuple[str, str, str],
        graph_wire: dict,
        workload: list,
        environment: dict,
        plan: Plan,
        implementations: list[dict],
    ) -> None:
        """Record the graph, workload, environment, implementations and plan in one transaction."""
        graph_key, workload_key, env_key = keys
        text = recipe_text(plan.to_recipe())
        now = _now()
        ops = Counter(node[0] for node in graph_wire["nodes"])
        db = self._db()
        with db.atomic():
            db["canonical_graphs"].insert(
                {
                    "key": graph_key,
                    "nodes": len(graph_wire["nodes"]),
                    "ops": json.dumps(dict(ops), sort_keys=True),
                    "graph": msgpack.packb(graph_wire, use_bin_type=True),
                    "created_at": now,
                },
                ignore=True,
            )
            self._environment_row(db, env_key, environment, now)
            db["workloads"].insert(
                {"key": workload_key, "inputs": json.dumps(workload), "created_at": now},
                ignore=True,
            )
            for impl in implementations:
                db["implementations"].insert(impl, ignore=True)
            db["plans"].upsert(
                {
                    "graph_key": graph_key,
                    "workload_key": workload_key,
                    "env_key": env_key,
                    "revision": plan.revision,
                    "policy": plan.policy,
                    "tuned": int(plan.tuned),
                    "recipe": text,
                    "checksum": recipe_checksum(keys, text),
                    "created_at": now,
                    "updated_at": now,
                },
                pk=("graph_key", "workload_key", "env_key"),
            )

    def record_verdicts(self, keys: tuple[str, str, str], verdicts: list[dict], plan: Plan) -> None:
        """Store validation verdicts and the plan revision they lead to, in one transaction."""
        text = recipe_text(plan.to_recipe())
        now = _now()
        db = self._db()
        with db.atomic():
            for v in verdicts:
                db["verdicts"].upsert(
                    dict(zip(("graph_key", "workload_key", "env_key"), keys)) | v | {"ok": int(v["ok"]), "created_at": now},
                    pk=("graph_key", "workload_key", "env_key", "region"),
                )
            db.execute(
                "UPDATE plans SET recipe = ?, checksum = ?, revision = ?, updated_at = ? "
                "WHERE graph_key = ? AND workload_key = ? AND env_key = ?",
                (text, recipe_checksum(keys, text), plan.revision, now, *keys),
            )

    def replace_plan(self, keys: tuple[str, str, str], plan: Plan) -> None:
        """Store ``plan`` (a tuned revision) over the existing row of ``keys``."""
        text = recipe_text(plan.to_recipe())
        db = self._db()
        with db.atomic():
            db.execute(
                "UPDATE plans SET recipe = ?, checksum = ?, revision = ?, policy = ?, tuned = ?, updated_at = ? "
                "WHERE graph_key = ? AND workload_key = ? AND env_key = ?",
                (text, recipe_checksum(keys, text), plan.revision, plan.policy, int(plan.tuned), _now(), *keys),
            )

    def failed_regions(self, keys: tuple[str, str, str]) -> frozenset[tuple[int, str]]:
        """(region output, kernel) pairs that failed strict validation for these keys: no
        later plan of the keys may use them."""
        rows = self._db().execute(
            "SELECT region, kernel FROM verdicts WHERE graph_key = ? AND workload_key = ? AND env_key = ? AND ok = 0", keys
        ).fetchall()
        return frozenset((int(r), str(k)) for r, k in rows)

    # -- environments and traces (the tuner) ----------------------------------------------
    def ceilings(self, env_key: str) -> dict | None:
        row = self._db().execute("SELECT ceilings FROM environments WHERE key = ?", (env_key,)).fetchone()
        if not row or not row[0]:
            return None
        try:
            value = json.loads(row[0])
        except ValueError:
            self.counters["corrupt_rows"] += 1
            return None
        return value if isinstance(value, dict) else None

    def set_ceilings(self, env_key: str, environment: dict, ceilings: dict) -> None:
        """Record an environment's measured ceilings (creating its row if needed)."""
        db = self._db()
        now = _now()
        with db.atomic():
            self._environment_row(db, env_key, environment, now)
            db.execute("UPDATE environments SET ceilings = ?, measured_at = ? WHERE key = ?",
                       (json.dumps(ceilings, sort_keys=True), now, env_key))

    def _environment_row(self, db: sqlite_utils.Database, env_key: str, environment: dict, now: str) -> None:
        db["environments"].insert(
            {
                "key": env_key,
                "device_type": str(environment.get("device_type", "")),
                "device_name": str(environment.get("device_name", "")),
                "details": json.dumps(environment, sort_keys=True, default=str),
                "created_at": now,
            },
            ignore=True,
        )

    def traces(self, env_key: str, region_keys: list[str]) -> dict[tuple[str, str], dict]:
        """The newest trace per (region key, implementation) measured in this environment."""
        found: dict[tuple[str, str], dict] = {}
        db = self._db()
        for start in range(0, len(region_keys), 500):
            chunk = region_keys[start:start + 500]
            rows = db.execute(
                "SELECT region_key, implementation_id, median_us, spread_us, repeats, max_rel_error, ok, id "
                f"FROM benchmark_traces WHERE env_key = ? AND region_key IN ({','.join('?' * len(chunk))}) ORDER BY id",
                (env_key, *chunk),
            ).fetchall()
            for rkey, impl, median, spread, repeats, err, ok, _ in rows:
                found[(rkey, impl)] = {"median_us": median, "spread_us": spread, "repeats": repeats,
                                       "max_rel_error": err, "ok": bool(ok)}
        return found

    def put_traces(self, rows: list[dict], implementations: list[dict]) -> None:
        """Benchmark results (one row per region and implementation), in one transaction."""
        if not rows:
            return
        now = _now()
        db = self._db()
        with db.atomic():
            for impl in implementations:
                db["implementations"].insert(impl, ignore=True)
            db["benchmark_traces"].insert_all([r | {"created_at": now} for r in rows])

    def get_job(self, keys: tuple[str, str, str]) -> tuple[dict, list, dict] | None:
        """(graph wire form, workload, environment) stored for a plan's keys, or None."""
        db = self._db()
        graph = db.execute("SELECT graph FROM canonical_graphs WHERE key = ?", (keys[0],)).fetchone()
        workload = db.execute("SELECT inputs FROM workloads WHERE key = ?", (keys[1],)).fetchone()
        env = db.execute("SELECT details FROM environments WHERE key = ?", (keys[2],)).fetchone()
        if not (graph and workload and env):
            return None
        try:
            return msgpack.unpackb(graph[0], raw=False, strict_map_key=False), json.loads(workload[0]), json.loads(env[0])
        except ValueError:
            self.counters["corrupt_rows"] += 1
            return None

    def plan_rows(self, untuned_only: bool = False) -> list[dict]:
        """One summary per stored plan, newest first."""
        where = "WHERE p.tuned = 0" if untuned_only else ""
        rows = self._db().execute(
            "SELECT p.graph_key, p.workload_key, p.env_key, p.revision, p.policy, p.tuned, p.updated_at, "
            "g.nodes, e.device_name, p.recipe FROM plans p LEFT JOIN canonical_graphs g ON g.key = p.graph_key "
            f"LEFT JOIN environments e ON e.key = p.env_key {where} ORDER BY p.updated_at DESC, p.graph_key"
        ).fetchall()
        out = []
        for gk, wk, ek, rev, policy, tuned, updated, nodes, device, recipe in rows:
            try:
                regions = [r["rule"] for r in json.loads(recipe)["regions"]]
            except (ValueError, KeyError, TypeError):
                regions = None
            out.append({"graph_key": gk, "workload_key": wk, "env_key": ek, "revision": rev, "policy": policy,
                        "tuned": bool(tuned), "updated_at": updated, "nodes": nodes, "device": device, "regions": regions})
        return out

    def flush(self) -> dict[str, int]:
        """Delete every row of every table (the schema stays); returns what was deleted."""
        counts = self.counts()
        db = self._db()
        with db.atomic():
            for table in ("verdicts", "benchmark_traces", "plans", "implementations", "canonical_graphs", "workloads", "environments"):
                db.execute(f"DELETE FROM [{table}]")
        db.execute("VACUUM")
        return counts

    # -- inspection -----------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        db = self._db()
        return {t: db.execute(f"SELECT count(*) FROM [{t}]").fetchone()[0] for t in TABLES}

    def size_bytes(self) -> int:
        return sum(
            Path(str(self.path) + s).stat().st_size for s in ("", "-wal") if Path(str(self.path) + s).exists()
        )

    def query(self, sql: str, params: Any = ()) -> list[tuple]:
        return self._db().execute(sql, params).fetchall()
