"""The plan store: SQLite (one file per host, WAL) by default, PostgreSQL for a cluster of hosts.

The daemon is the only writer of a SQLite store; several daemons may share a PostgreSQL one.
A row whose checksum or format does not verify is a miss: it is counted, moved to
``quarantine`` and re-planned, never served. A damaged SQLite file is moved aside whole and a
fresh store keeps the rows it could still read; a store that cannot be written serves read-only
(:mod:`hypatia.planner.connections`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any

import msgpack

from hypatia.canonical import workload_phase
from hypatia.planner.artifacts import ArtifactStore
from hypatia.planner.connections import StoreConnections, operation, write
from hypatia.planner.databases import Database, StoreError, UnreadableStore, UnwritableStore
from hypatia.planner.plan import Plan, PlanFormatError, recipe_checksum, recipe_text, verified_plan
from hypatia.planner.schema import SCHEMA_VERSION, TABLES

__all__ = ["SCHEMA_VERSION", "TABLES", "Store", "StoreError", "UnreadableStore", "UnwritableStore"]

log = logging.getLogger("hypatia.store")

PLAN_PK = ("graph_key", "workload_key", "env_key")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _columns(names: Any) -> str:
    return ", ".join(f'"{n}"' for n in names)


class Store(ArtifactStore, StoreConnections):
    """The plan store at ``location`` (a SQLite file path or a ``postgresql://`` URL);
    ``readonly`` opens it for inspection only; ``migrate=False`` opens one that its daemon has
    opened and migrated already (a worker process). How it opens, and what it does when its file
    is damaged or cannot be written, is :class:`~hypatia.planner.connections.StoreConnections`."""

    # -- the SQL both databases share -----------------------------------------------------
    @staticmethod
    def _insert(db: Database, table: str, row: dict, ignore: bool = False) -> None:
        conflict = " ON CONFLICT DO NOTHING" if ignore else ""
        db.execute(
            f'INSERT INTO "{table}" ({_columns(row)}) VALUES ({", ".join("?" * len(row))}){conflict}',
            tuple(row.values()),
        )

    @staticmethod
    def _upsert(db: Database, table: str, row: dict, pk: tuple[str, ...]) -> None:
        updates = ", ".join(f'"{c}" = excluded."{c}"' for c in row if c not in pk)
        db.execute(
            f'INSERT INTO "{table}" ({_columns(row)}) VALUES ({", ".join("?" * len(row))}) '
            f"ON CONFLICT ({_columns(pk)}) DO UPDATE SET {updates}",
            tuple(row.values()),
        )

    def _quarantine(self, db: Database, source: str, key: Any, content: Any, reason: str) -> None:
        """Move a row that failed verification out of the way (never served again, kept to read)."""
        self.counters["corrupt_rows"] += 1
        self.counters["quarantined_rows"] += 1
        self._insert(db, "quarantine", {
            "source": source,
            "row_key": json.dumps(key),
            "content": content if isinstance(content, str) else repr(content)[:100_000],
            "reason": reason,
            "created_at": _now(),
        })

    # -- plans ----------------------------------------------------------------------------
    @operation
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
            return verified_plan(keys, text, checksum)
        except PlanFormatError as exc:
            log.error("plan row %s failed verification (%s); quarantined, re-planning", keys, exc)
            if self.readonly or not self.writable:
                self.counters["corrupt_rows"] += 1
                return None
            try:
                with db.atomic():
                    self._quarantine(db, "plans", list(keys), text, str(exc))
                    db.execute("DELETE FROM plans WHERE graph_key = ? AND workload_key = ? AND env_key = ?", keys)
            except UnwritableStore as refused:  # never served either way; moved when space is back
                self.write_refused(refused)
            return None

    @write
    def put_plan(
        self,
        keys: tuple[str, str, str],
        graph_wire: dict,
        workload: list,
        environment: dict,
        plan: Plan,
        implementations: list[dict],
        model: str = "",
    ) -> None:
        """Record the graph, workload, environment, implementations and plan in one transaction;
        ``model`` labels the graph for people (the first label given is kept)."""
        graph_key, workload_key, env_key = keys
        text = recipe_text(plan.to_recipe())
        now = _now()
        ops = Counter(node[0] for node in graph_wire["nodes"])
        db = self._db()
        with db.atomic():
            self._insert(db, "canonical_graphs", {
                "key": graph_key,
                "nodes": len(graph_wire["nodes"]),
                "ops": json.dumps(dict(ops), sort_keys=True),
                "graph": msgpack.packb(graph_wire, use_bin_type=True),
                "created_at": now,
                "model": model or None,
            }, ignore=True)
            if model:
                db.execute("UPDATE canonical_graphs SET model = ? WHERE key = ? AND model IS NULL", (model, graph_key))
            self._environment_row(db, env_key, environment, now)
            self._insert(db, "workloads", {"key": workload_key, "inputs": json.dumps(workload), "created_at": now},
                         ignore=True)
            for impl in implementations:
                self._insert(db, "implementations", impl, ignore=True)
            self._upsert(db, "plans", {
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
                }, PLAN_PK)

    @write
    def record_verdicts(self, keys: tuple[str, str, str], verdicts: list[dict], plan: Plan) -> None:
        """Store validation verdicts and the plan revision they lead to, in one transaction."""
        text = recipe_text(plan.to_recipe())
        now = _now()
        db = self._db()
        with db.atomic():
            for v in verdicts:
                self._upsert(
                    db, "verdicts", dict(zip(PLAN_PK, keys)) | v | {"ok": int(v["ok"]), "created_at": now},
                    (*PLAN_PK, "region"),
                )
            db.execute(
                "UPDATE plans SET recipe = ?, checksum = ?, revision = ?, updated_at = ? "
                "WHERE graph_key = ? AND workload_key = ? AND env_key = ?",
                (text, recipe_checksum(keys, text), plan.revision, now, *keys),
            )

    @write
    def put_region_verdicts(self, env_key: str, verdicts: list[dict]) -> None:
        """Verdicts per region structure (``region_key``, ``implementation_id``, ``rule``, ``ok``,
        errors, ``detail``) in ``env_key``. A failure replaces a pass, never the other way round:
        once a shape has failed anywhere, no later check lets it run again."""
        if not verdicts:
            return
        now = _now()
        db = self._db()
        pk = ("env_key", "region_key", "implementation_id")
        with db.atomic():
            for v in verdicts:
                row = {
                    "env_key": env_key,
                    "region_key": v["region_key"],
                    "implementation_id": v["implementation_id"],
                    "rule": v.get("rule", ""),
                    "ok": int(bool(v["ok"])),
                    "max_abs_err": float(v.get("max_abs_err") or 0.0),
                    "max_rel_err": float(v.get("max_rel_err") or 0.0),
                    "detail": str(v.get("detail", ""))[:500],
                    "created_at": now,
                }
                if row["ok"]:
                    self._insert(db, "region_verdicts", row, ignore=True)
                else:
                    self._upsert(db, "region_verdicts", row, pk)

    @operation
    def region_verdicts(self, env_key: str, region_keys: list[str]) -> dict[tuple[str, str], bool]:
        """(region key, implementation) -> passed, for what has been validated in ``env_key``."""
        rows = self._by_region("SELECT region_key, implementation_id, ok FROM region_verdicts", env_key, region_keys)
        return {(rkey, impl): bool(ok) for rkey, impl, ok in rows}

    def _by_region(self, select: str, env_key: str, region_keys: list[str], order: str = "") -> list[tuple]:
        """The rows of ``select`` for ``env_key`` whose region key is one of ``region_keys``
        (asked 500 keys at a time: both databases bound the number of parameters)."""
        db = self._db()
        rows: list[tuple] = []
        for start in range(0, len(region_keys), 500):
            chunk = region_keys[start:start + 500]
            rows += db.execute(
                f"{select} WHERE env_key = ? AND region_key IN ({','.join('?' * len(chunk))}){order}", (env_key, *chunk),
            ).fetchall()
        return rows

    @write
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

    @operation
    def failed_regions(self, keys: tuple[str, str, str]) -> frozenset[tuple[int, str]]:
        """(region output, kernel) pairs that failed strict validation for these keys: no
        later plan of the keys may use them."""
        rows = self._db().execute(
            "SELECT region, kernel FROM verdicts WHERE graph_key = ? AND workload_key = ? AND env_key = ? AND ok = 0", keys
        ).fetchall()
        return frozenset((int(r), str(k)) for r, k in rows)

    # -- environments and traces (the tuner) ----------------------------------------------
    @operation
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

    @write
    def set_ceilings(self, env_key: str, environment: dict, ceilings: dict) -> None:
        """Record an environment's measured ceilings (creating its row if needed)."""
        db = self._db()
        now = _now()
        with db.atomic():
            self._environment_row(db, env_key, environment, now)
            db.execute("UPDATE environments SET ceilings = ?, measured_at = ? WHERE key = ?",
                       (json.dumps(ceilings, sort_keys=True), now, env_key))

    def _environment_row(self, db: Database, env_key: str, environment: dict, now: str) -> None:
        self._insert(db, "environments", {
            "key": env_key,
            "device_type": str(environment.get("device_type", "")),
            "device_name": str(environment.get("device_name", "")),
            "details": json.dumps(environment, sort_keys=True, default=str),
            "created_at": now,
        }, ignore=True)

    @operation
    def traces(self, env_key: str, region_keys: list[str]) -> dict[tuple[str, str], dict]:
        """The newest trace per (region key, implementation) measured in this environment."""
        found: dict[tuple[str, str], dict] = {}
        rows = self._by_region("SELECT region_key, implementation_id, median_us, spread_us, repeats, max_rel_error, ok, id "
                               "FROM benchmark_traces", env_key, region_keys, " ORDER BY id")
        for rkey, impl, median, spread, repeats, err, ok, _ in rows:  # in id order: the newest wins
            found[(rkey, impl)] = {"median_us": median, "spread_us": spread, "repeats": repeats,
                                   "max_rel_error": err, "ok": bool(ok)}
        return found

    @write
    def put_traces(self, rows: list[dict], implementations: list[dict]) -> None:
        """Benchmark results (one row per region and implementation), in one transaction."""
        if not rows:
            return
        now = _now()
        db = self._db()
        with db.atomic():
            for impl in implementations:
                self._insert(db, "implementations", impl, ignore=True)
            columns = sorted({c for r in rows for c in r} | {"created_at"})
            db.executemany(
                f'INSERT INTO "benchmark_traces" ({_columns(columns)}) VALUES ({", ".join("?" * len(columns))})',
                [tuple((r | {"created_at": now}).get(c) for c in columns) for r in rows],
            )

    @operation
    def get_job(self, keys: tuple[str, str, str]) -> tuple[dict, list, dict] | None:
        """(graph wire form, workload, environment) stored for a plan's keys, or None."""
        db = self._db()
        graph = db.execute("SELECT graph FROM canonical_graphs WHERE key = ?", (keys[0],)).fetchone()
        workload = db.execute("SELECT inputs FROM workloads WHERE key = ?", (keys[1],)).fetchone()
        env = db.execute("SELECT details FROM environments WHERE key = ?", (keys[2],)).fetchone()
        if not (graph and workload and env):
            return None
        try:
            return (msgpack.unpackb(bytes(graph[0]), raw=False, strict_map_key=False), json.loads(workload[0]),
                    json.loads(env[0]))
        except ValueError:
            self.counters["corrupt_rows"] += 1
            return None

    def probe(self) -> None:
        """For a daemon whose store cannot be written while its writes happen elsewhere (its
        worker processes): when a retry is due, write nothing new (the schema version, set
        again) to find out whether it can be written again. Not a dropped write when it fails."""
        if self.writable or self.readonly or self.postgres or not self.ready_to_write():
            return
        try:
            self._rewrite_version()
        except UnwritableStore:
            return
        self.wrote()

    @operation
    def _rewrite_version(self) -> None:
        db = self._db()
        with db.atomic():
            db.execute(f"PRAGMA user_version = {int(db.schema_version())}")

    @write
    def mark_untunable(self, keys: tuple[str, str, str], reason: str) -> None:
        """Record that tuning the plan of ``keys`` failed in its environment: never tried again."""
        db = self._db()
        with db.atomic():
            self._upsert(db, "untunable", dict(zip(PLAN_PK, keys)) | {"reason": reason[:500], "created_at": _now()},
                         PLAN_PK)

    @operation
    def untunable(self) -> dict[tuple[str, str, str], str]:
        """Every plan marked untunable, with the reason."""
        rows = self._db().execute("SELECT graph_key, workload_key, env_key, reason FROM untunable").fetchall()
        return {(g, w, e): r for g, w, e, r in rows}

    @operation
    def plan_rows(self, untuned_only: bool = False) -> list[dict]:
        """One summary per stored plan, newest first."""
        where = "WHERE p.tuned = 0" if untuned_only else ""
        rows = self._db().execute(
            "SELECT p.graph_key, p.workload_key, p.env_key, p.revision, p.policy, p.tuned, p.updated_at, "
            "g.nodes, e.device_name, p.recipe, g.model, w.inputs FROM plans p "
            "LEFT JOIN canonical_graphs g ON g.key = p.graph_key LEFT JOIN environments e ON e.key = p.env_key "
            f"LEFT JOIN workloads w ON w.key = p.workload_key {where} ORDER BY p.updated_at DESC, p.graph_key"
        ).fetchall()
        out = []
        for gk, wk, ek, rev, policy, tuned, updated, nodes, device, recipe, model, inputs in rows:
            try:
                regions = [r["rule"] for r in json.loads(recipe)["regions"]]
            except (ValueError, KeyError, TypeError):
                regions = None
            try:
                graph = workload_phase(json.loads(inputs)) if inputs else None
            except (ValueError, KeyError, TypeError):
                graph = None
            out.append({"graph_key": gk, "workload_key": wk, "env_key": ek, "revision": rev, "policy": policy,
                        "tuned": bool(tuned), "updated_at": updated, "nodes": nodes, "device": device, "regions": regions,
                        "model": model, "graph": graph})
        return out

    @operation
    def flush(self) -> dict[str, int]:
        """Delete every row of every table (the schema stays); returns what was deleted."""
        counts = self.counts()
        db = self._db()
        with db.atomic():
            for table in ("artifacts", "untunable", "verdicts", "region_verdicts", "benchmark_traces", "plans", "implementations",
                          "canonical_graphs", "workloads", "environments", "quarantine"):
                db.execute(f'DELETE FROM "{table}"')
        db.compact()
        return counts

    # -- inspection -----------------------------------------------------------------------
    @operation
    def counts(self) -> dict[str, int]:
        db = self._db()
        return {t: db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in TABLES}

    @operation
    def size_bytes(self) -> int:
        return self._db().size_bytes()

    @operation
    def query(self, sql: str, params: Any = ()) -> list[tuple]:
        return self._db().execute(sql, params).fetchall()
