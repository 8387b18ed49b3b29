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
import shutil
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
    """The database exists but is not a readable store (a damaged or foreign file); ``detail``
    is what SQLite said."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


class UnwritableStore(StoreError):
    """The store's file is sound but where it lives refuses it: the disk is full, the file or
    its file system is read-only, its files cannot be created, or an I/O error. ``reason`` says
    which, for a log line or ``hypatia-ctl stats``."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


# SQLite's result codes (their extended forms start with these names) for a damaged file and for
# a file the file system will not let it use; the message text covers builds without the names.
_DAMAGED = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
_REFUSED = ("SQLITE_FULL", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_PERM")
_LOCKED = ("SQLITE_BUSY", "SQLITE_LOCKED")
LOW_SPACE_BYTES = 1 << 20


def damaged(path: Path, detail: str) -> UnreadableStore:
    return UnreadableStore(
        f"the store {path} is damaged ({detail}); start or restart hypatiad (hypatia-ctl stop; hypatiad start): "
        f"it moves the file aside as {path.name}.corrupt-<time>, keeps the rows it can still read and goes on",
        detail,
    )


def unwritable(path: Path, exc: sqlite3.Error) -> UnwritableStore:
    """What stops SQLite using ``path``, in words, with the way out."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    said = f"{exc}, {name}" if name else str(exc)
    try:
        low = shutil.disk_usage(path.parent).free < LOW_SPACE_BYTES
    except OSError:
        low = False
    if name.startswith("SQLITE_FULL") or low or "disk is full" in str(exc):
        reason, fix = f"the disk is full ({said})", f"free space on the file system of {path.parent}"
    elif name.startswith(("SQLITE_READONLY", "SQLITE_PERM")) or "readonly" in str(exc):
        reason, fix = f"it is read-only ({said})", f"make {path} and {path.parent} writable"
    elif name.startswith("SQLITE_CANTOPEN"):
        reason, fix = f"its files cannot be created or opened ({said})", f"check {path.parent} and its free space"
    else:
        reason, fix = f"an I/O error ({said})", f"check the disk holding {path.parent}"
    return UnwritableStore(f"the store {path} cannot be written: {reason}; {fix}, "
                           "or point HYPATIA_HOME (or XDG_CACHE_HOME) elsewhere", reason)


def classify(exc: sqlite3.Error, path: Path) -> Exception:
    """The store's error for an error of SQLite's: damaged, unwritable or locked; ``exc`` itself
    for any other (a defect, not a state of the file)."""
    name, text = getattr(exc, "sqlite_errorname", "") or "", str(exc)
    if name.startswith(_DAMAGED) or "malformed" in text or "not a database" in text:
        return damaged(path, text)
    if name.startswith(_REFUSED) or "disk is full" in text or "readonly database" in text:
        return unwritable(path, exc)
    if name.startswith(_LOCKED):
        return StoreError(f"the store {path} stayed locked by another process ({text}); retry, and stop "
                          "any other program that writes it")
    return exc


def is_postgres(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


class Database:
    """One connection to a store database; not shared between threads."""

    dialect: str
    location: str
    generation = 0  # the store generation it was opened in (see hypatia.planner.connections)

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

    def check(self) -> None:
        """Raise :class:`UnreadableStore` if the database is damaged, where it can tell."""

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

    def __init__(self, path: Path, readonly: bool = False, immutable: bool = False):
        """``immutable``: read the file without SQLite's shared-memory index (which cannot be
        created on a full disk); only while nothing writes it."""
        self.path = Path(path)
        self.location = str(self.path)
        with self._reported():
            if immutable:
                conn = sqlite3.connect(f"file:{self.path}?immutable=1", uri=True, timeout=10, check_same_thread=False)
            elif readonly:
                conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10, check_same_thread=False)
            else:
                conn = sqlite3.connect(str(self.path), timeout=10, check_same_thread=False)
            self.db = sqlite_utils.Database(conn, execute_plugins=False)
            self.db.execute("PRAGMA busy_timeout = 10000")
            self.db.execute("PRAGMA foreign_keys = ON")
        self._savepoints = itertools.count()

    @contextlib.contextmanager
    def _reported(self):
        """SQLite's errors about the file as the store's (:func:`classify`)."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            problem = classify(exc, self.path)
            if problem is exc:
                raise
            raise problem from exc

    def execute(self, sql: str, params: Iterable[Any] = ()) -> "Rows":
        # Every row is read here, so that a damaged page reached by a fetch is reported like one
        # reached by the statement itself.
        with self._reported():
            return Rows(self.db.execute(sql, tuple(params)).fetchall())

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        with self._reported():
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
        with self._reported():
            conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # a damaged or full file may refuse even this
                conn.rollback()
            raise
        with self._reported():
            try:
                conn.commit()
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    conn.rollback()
                raise

    def schema_version(self) -> int:
        with self._reported():
            return self.db.execute("PRAGMA user_version").fetchone()[0]

    def check(self) -> None:
        """Read every page once (``quick_check``): a damaged file fails here, at open, rather than
        later on each query that reaches a damaged page."""
        with self._reported():
            problems = [row[0] for row in self.db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise damaged(self.path, f"failed its integrity check: {'; '.join(problems[:3])}")

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
            self.check()
        except sqlite3.DatabaseError as exc:
            problem = classify(exc, self.path)
            # anything else that stops the schema being built: not a store of ours
            raise (damaged(self.path, str(exc)) if problem is exc else problem) from exc

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

    def compact(self) -> None:
        self.db.execute("VACUUM")

    def close(self) -> None:
        self.db.conn.close()


class Rows(list):
    """The rows a statement returned, read as from a cursor."""

    def fetchone(self) -> Any:
        return self[0] if self else None

    def fetchall(self) -> list:
        return list(self)


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
        except self._psycopg.errors.DiskFull as exc:
            raise UnwritableStore(f"the PostgreSQL store {self.location} cannot be written: {_said(exc)}; free space "
                                  "on its server", f"the server's disk is full ({_said(exc)})") from exc
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


def connect(location: str | Path, readonly: bool = False, immutable: bool = False) -> Database:
    """A connection to the store at ``location``: a ``postgresql://`` URL or a SQLite file path."""
    if is_postgres(location):
        return PostgresDatabase(str(location), readonly)
    return SqliteDatabase(Path(location), readonly, immutable)
