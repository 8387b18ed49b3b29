"""The two databases the plan store runs on, behind the few calls it needs.

SQLite (one file per host, the default) and PostgreSQL (one server that the daemons of many hosts
share) differ in how they connect, where they keep the schema version, how they migrate and how
their size is read. The store's own SQL is the same text for both: ``?`` placeholders,
``ON CONFLICT`` and double-quoted names.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sqlite3
from pathlib import Path
from typing import Any, ContextManager, Iterable

import sqlite_utils

from hypatia.config import redact
from hypatia.planner.schema import MIGRATIONS, POSTGRES_MIGRATIONS, SCHEMA_VERSION, TABLES

log = logging.getLogger("hypatia.store")

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# pg_advisory_xact_lock key: daemons starting together against one server migrate one at a time.
_MIGRATION_LOCK = 0x4879_7061_7469_61


class StoreError(Exception):
    """The store cannot be opened or used as it is; the message says what to do."""


class UnreadableStore(StoreError):
    """The database exists but is not a readable store (a damaged or foreign file)."""


def is_postgres(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


class Database:
    """One connection to a store database; not shared between threads."""

    dialect: str
    location: str

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
        """Run one statement and return its cursor (``fetchone``/``fetchall``)."""
        raise NotImplementedError

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        raise NotImplementedError

    def atomic(self) -> ContextManager:
        """A transaction: committed when the block ends, rolled back if it raises."""
        raise NotImplementedError

    def schema_version(self) -> int:
        raise NotImplementedError

    def migrate(self) -> None:
        """Bring the schema to :data:`SCHEMA_VERSION`; refuse a newer one."""
        raise NotImplementedError

    def size_bytes(self) -> int:
        raise NotImplementedError

    def compact(self) -> None:
        """Give space back after a flush, where the database needs to be asked."""

    @property
    def broken(self) -> bool:
        """The connection is lost and must be replaced."""
        return False

    def close(self) -> None:
        raise NotImplementedError

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.location} was written by a newer Hypatia (schema {version} > {SCHEMA_VERSION}); "
                "upgrade Hypatia, or point HYPATIA_HOME / HYPATIA_STORE elsewhere"
            )


class SqliteDatabase(Database):
    """A SQLite file in WAL mode, through sqlite-utils."""

    dialect = "sqlite"

    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        self.location = str(self.path)
        try:
            if readonly:
                conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10, check_same_thread=False)
            else:
                conn = sqlite3.connect(str(self.path), timeout=10, check_same_thread=False)
            self.db = sqlite_utils.Database(conn, execute_plugins=False)
            self.db.execute("PRAGMA busy_timeout = 10000")
            self.db.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as exc:
            raise UnreadableStore(f"{self.path} is not a readable store: {exc}") from exc
        self._savepoints = itertools.count()

    def execute(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        return self.db.execute(sql, tuple(params))

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        self.db.conn.executemany(sql, rows)

    @contextlib.contextmanager
    def atomic(self):
        """``BEGIN IMMEDIATE``: take the write lock before the first read, so that a writer waits
        for another (busy_timeout) instead of failing at once with "database is locked", which
        SQLite does to a deferred transaction that has read. Nested blocks are savepoints."""
        conn = self.db.conn
        if conn.in_transaction:
            name = f"hypatia_{next(self._savepoints)}"
            conn.execute(f"SAVEPOINT {name}")
            try:
                yield
            except BaseException:
                conn.execute(f"ROLLBACK TO {name}")
                conn.execute(f"RELEASE {name}")
                raise
            conn.execute(f"RELEASE {name}")
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.rollback()
            raise
        conn.commit()

    def schema_version(self) -> int:
        try:
            return self.db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise UnreadableStore(f"{self.path} is not a readable store: {exc}") from exc

    def migrate(self) -> None:
        try:
            self.db.enable_wal()
            version = self.schema_version()
            self._refuse_newer(version)
            for target in range(version + 1, SCHEMA_VERSION + 1):
                with self.atomic():
                    MIGRATIONS[target - 1](self.db)
                    self.db.execute(f"PRAGMA user_version = {target}")
                log.info("store %s migrated to schema %d", self.path, target)
            # Every page once: a file cut short behind a surviving WAL still opens and reads its
            # first page, and would fail only later, on each query that reaches a lost page.
            problems = [row[0] for row in self.db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise UnreadableStore(f"{self.path} failed its integrity check: {'; '.join(problems[:3])}")
        except sqlite3.DatabaseError as exc:
            raise UnreadableStore(f"{self.path} is not a readable store: {exc}") from exc

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

    def compact(self) -> None:
        self.db.execute("VACUUM")

    def close(self) -> None:
        self.db.conn.close()


class PostgresDatabase(Database):
    """A PostgreSQL database through psycopg 3, in autocommit mode outside :meth:`atomic` blocks."""

    dialect = "postgresql"

    def __init__(self, url: str, readonly: bool = False):
        try:
            import psycopg
        except ImportError:
            raise StoreError(
                "HYPATIA_STORE names a PostgreSQL server, but psycopg 3 is not installed; "
                "install it with: pip install 'hypatia[postgres]'"
            ) from None
        self._psycopg = psycopg
        self.location = redact(url)
        options = {"options": "-c default_transaction_read_only=on"} if readonly else {}
        try:
            self.conn = psycopg.connect(url, autocommit=True, connect_timeout=10, application_name="hypatiad", **options)
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot reach the PostgreSQL store {self.location}: {_said(exc)}; "
                "check HYPATIA_STORE and that the server accepts connections"
            ) from exc

    @contextlib.contextmanager
    def _reported(self):
        """A lost server or connection as a :class:`StoreError` that names the store."""
        try:
            yield
        except self._psycopg.OperationalError as exc:
            raise StoreError(f"the PostgreSQL store {self.location} failed: {_said(exc)}") from exc

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
        with self._reported():
            return self.conn.execute(_pg(sql), tuple(params))

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        with self._reported(), self.conn.cursor() as cur:
            cur.executemany(_pg(sql), rows)

    def atomic(self) -> ContextManager:
        return self.conn.transaction()

    def schema_version(self) -> int:
        try:
            row = self.execute("SELECT version FROM hypatia_schema").fetchone()
        except self._psycopg.errors.UndefinedTable:
            return 0
        return int(row[0]) if row else 0

    def migrate(self) -> None:
        with self.conn.transaction():
            self.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            self.execute("CREATE TABLE IF NOT EXISTS hypatia_schema (version INTEGER NOT NULL)")
            row = self.execute("SELECT version FROM hypatia_schema").fetchone()
            if row is None:
                self.execute("INSERT INTO hypatia_schema (version) VALUES (0)")
            version = int(row[0]) if row else 0
            self._refuse_newer(version)
            for target in range(version + 1, SCHEMA_VERSION + 1):
                with self.conn.transaction():
                    for statement in POSTGRES_MIGRATIONS[target - 1]:
                        self.execute(statement)
                    self.execute("UPDATE hypatia_schema SET version = ?", (target,))
                log.info("store %s migrated to schema %d", self.location, target)

    def size_bytes(self) -> int:
        row = self.execute(
            "SELECT COALESCE(sum(pg_total_relation_size(to_regclass(t))), 0) FROM unnest(?::text[]) AS t",
            (list(TABLES),),
        ).fetchone()
        return int(row[0])

    @property
    def broken(self) -> bool:
        return self.conn.broken or self.conn.closed

    def close(self) -> None:
        self.conn.close()


def _said(exc: BaseException) -> str:
    # psycopg's messages span lines; a store error is read in one log line.
    return " ".join(str(exc).split())


def _pg(sql: str) -> str:
    # The store writes no literal '%' or '?' in its SQL, so the placeholders map one to one.
    return sql.replace("?", "%s")


def connect(location: str | Path, readonly: bool = False) -> Database:
    """A connection to the store at ``location``: a ``postgresql://`` URL or a SQLite file path."""
    if is_postgres(location):
        return PostgresDatabase(str(location), readonly)
    return SqliteDatabase(Path(location), readonly)
