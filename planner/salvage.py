"""A damaged SQLite store: moved aside whole, and the rows it can still give copied into a fresh one.

A scan of a table in rowid order stops at a damaged page; the copy goes on past it by seeking the
next row at growing distances beyond the last row read (then back down to the nearest point
that reads), so only what lies on damaged pages is lost. Tables are copied parents first, so the
fresh store's foreign keys hold; a row that breaks one (its parent was lost) is skipped, and a
plan row is copied only if its checksum and recipe verify, the check every lookup makes.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from pathlib import Path
from typing import Iterator

from hypatia.planner.databases import Database
from hypatia.planner.plan import PlanFormatError, verified_plan
from hypatia.planner.schema import TABLES

log = logging.getLogger("hypatia.store")

CHUNK = 256
MAX_ROWID = (1 << 63) - 1


def move_aside(path: Path) -> Path:
    """Rename ``path`` and its -wal and -shm to ``<name>.corrupt-<time>``; returns the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():  # a second repair within the same second
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            src.rename(Path(f"{aside}{suffix}"))
    return aside


def copy_readable_rows(aside: Path, db: Database) -> dict[str, int]:
    """Copy every row of ``aside`` that can be read (and, for plans, verifies) into ``db``, a
    fresh store; returns the number of rows copied per table (tables with none left out)."""
    source = _open(aside)
    if source is None:
        return {}
    copied: dict[str, int] = {}
    try:
        for table in TABLES:
            columns = _shared_columns(source, db, table)
            if not columns:
                continue
            insert = (f'INSERT INTO "{table}" ({_names(columns)}) VALUES ({", ".join("?" * len(columns))}) '
                      "ON CONFLICT DO NOTHING")
            n = 0
            with db.atomic():
                for row in readable_rows(source, table, columns):
                    if table == "plans" and not _plan_verifies(dict(zip(columns, row))):
                        continue
                    try:
                        db.execute(insert, row)
                    except sqlite3.IntegrityError:  # its graph, workload or environment was lost
                        continue
                    n += 1
            if n:
                copied[table] = n
    finally:
        source.close()
    return copied


def readable_rows(conn: sqlite3.Connection, table: str, columns: list[str]) -> Iterator[tuple]:
    """The rows of ``table`` that can be read, in rowid order, past any damaged page."""
    # ">=", not ">": a seek past rowid n visits the page that holds n, damaged or not
    select = f'SELECT rowid, {_names(columns)} FROM "{table}" WHERE rowid >= ? ORDER BY rowid LIMIT ?'
    at = 1  # the store's rowids are SQLite's own: from 1 up
    careful = 0  # rows still to read one at a time, near a damaged page
    while True:
        try:
            rows = conn.execute(select, (at, 1 if careful else CHUNK)).fetchall()
            careful = max(careful - 1, 0)
        except sqlite3.DatabaseError:
            if not careful:  # somewhere in this chunk: read up to it one row at a time
                careful = CHUNK
                continue
            rows = _past_damage(conn, select, at)  # this very row: go past it
            careful = 0
        if not rows:
            return
        for row in rows:
            yield tuple(row[1:])
        at = rows[-1][0] + 1


def _past_damage(conn: sqlite3.Connection, select: str, failed: int) -> list[tuple]:
    """The first row that can be read beyond the damaged page that reading from rowid
    ``failed`` ran into, as a one-row list ([] if there is none)."""
    def probe(at: int) -> list[tuple] | None:
        try:
            return conn.execute(select, (at, 1)).fetchall()
        except sqlite3.DatabaseError:
            return None

    step = 1
    while failed + step <= MAX_ROWID:
        found = probe(failed + step)
        if found is not None:  # fails at `failed`, reads at failed + step: find the nearest point that reads
            lo, hi = failed, failed + step
            while hi - lo > 1:
                mid = (lo + hi) // 2
                nearer = probe(mid)
                if nearer is None:
                    lo = mid
                else:
                    hi, found = mid, nearer
            return found
        failed, step = failed + step, step * 2
    return []


def _open(aside: Path) -> sqlite3.Connection | None:
    for uri in (f"file:{aside}?mode=ro", f"file:{aside}?immutable=1"):
        conn = None
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=10)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.Error as exc:
            log.debug("cannot read %s as %s: %s", aside, uri, exc)
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
    return None


def _shared_columns(source: sqlite3.Connection, db: Database, table: str) -> list[str]:
    """The columns ``table`` has in both databases ([] if the damaged one cannot say)."""
    try:
        old = [r[1] for r in source.execute(f'PRAGMA table_info("{table}")').fetchall()]
    except sqlite3.DatabaseError:
        return []
    new = {r[1] for r in db.execute(f'PRAGMA table_info("{table}")').fetchall()}
    return [c for c in old if c in new]


def _names(columns: list[str]) -> str:
    return ", ".join(f'"{c}"' for c in columns)


def _plan_verifies(row: dict) -> bool:
    keys = (row.get("graph_key"), row.get("workload_key"), row.get("env_key"))
    if not all(isinstance(k, str) for k in keys):
        return False
    try:
        verified_plan(keys, row.get("recipe"), row.get("checksum"))  # type: ignore[arg-type]
    except PlanFormatError:
        return False
    return True
