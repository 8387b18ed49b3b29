"""The store's connections, and what keeps the store serving when its file cannot be used as is.

Each thread has its own connection, opened in the current *generation* of the store: when the
file is replaced or reopened another way, the generation moves on and every thread's next
operation opens a new connection.

Two kinds of trouble, told apart by what SQLite says (:func:`~hypatia.planner.databases.classify`):

- **Damaged** (fails its integrity check at open, or "malformed" / "not a database" later, on
  any thread): the file is moved aside as ``<name>.corrupt-<time>`` (with its -wal and -shm),
  a fresh store takes its place with every row that could still be read
  (:mod:`~hypatia.planner.salvage`), and the operation that found it runs once more against
  the fresh store. One repair per damage, however many threads see it.
- **Unwritable** (disk full, read-only file or file system, files that cannot be created, I/O
  errors): the file is sound and is never moved aside. The store serves what it holds
  read-only, counts and drops the writes it cannot make, and tries writing again every
  ``retry_s`` seconds; it writes again as soon as one try succeeds.

Every public operation runs under :func:`operation` or :func:`write`, on the shared side of a
:class:`UseLock`; a repair or a switch between read-only and writable connections takes the
exclusive side, so it closes connections no other thread is using. (Closing the last connection
of a SQLite file in WAL mode deletes its -wal and -shm *by name*: a connection of the old file
still open once a new file has that name could delete the new file's log.)

PostgreSQL stores are never moved aside: their errors are reported as they are.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from hypatia.config import redact
from hypatia.planner import salvage
from hypatia.planner.databases import Database, StoreError, UnreadableStore, UnwritableStore, connect, is_postgres
from hypatia.planner.schema import SCHEMA_VERSION

log = logging.getLogger("hypatia.store")

F = TypeVar("F", bound=Callable[..., Any])


class UseLock:
    """Store operations run together on its shared side (re-entrant per thread); a repair runs
    alone on its exclusive side, after the operations in progress and before any new one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0
        self._exclusive = False
        self._waiting = 0
        self._depth = threading.local()

    def held(self) -> bool:
        """Whether this thread is inside an operation."""
        return getattr(self._depth, "n", 0) > 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._depth, "n", 0)
        if depth == 0:
            with self._cond:
                while self._exclusive or self._waiting:
                    self._cond.wait()
                self._users += 1
        self._depth.n = depth + 1
        try:
            yield
        finally:
            self._depth.n = depth
            if depth == 0:
                with self._cond:
                    self._users -= 1
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        assert not self.held(), "an operation cannot wait for itself to end"
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._users:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def operation(fn: F) -> F:
    """A store operation: a damaged SQLite file found on the way is repaired and the operation
    runs once more against the fresh store."""
    @functools.wraps(fn)
    def run(store: "StoreConnections", *args: Any, **kwargs: Any) -> Any:
        outermost = not store.use.held()  # only the outermost operation repairs: the others are inside it
        with store.use.shared():
            generation = store.generation
            try:
                return fn(store, *args, **kwargs)
            except UnreadableStore as exc:
                if not outermost:
                    raise
                damage = exc
        if not store.repair(generation, damage):
            raise damage
        with store.use.shared():
            return fn(store, *args, **kwargs)
    return run  # type: ignore[return-value]


def write(fn: F) -> F:
    """An :func:`operation` that writes: dropped (counted, None returned) while the store cannot
    be written; one the file system refuses makes the store read-only until a retry succeeds."""
    op = operation(fn)

    @functools.wraps(fn)
    def run(store: "StoreConnections", *args: Any, **kwargs: Any) -> Any:
        if store.readonly:  # opened for inspection: a write is a mistake, and says so
            return op(store, *args, **kwargs)
        if not store.ready_to_write():
            store.counters["store_writes_dropped"] += 1
            return None
        try:
            result = op(store, *args, **kwargs)
        except UnwritableStore as exc:
            store.write_refused(exc)
            return None
        store.wrote()
        return result
    return run  # type: ignore[return-value]


class StoreConnections:
    """Connections to the store at ``location`` (a SQLite path or a ``postgresql://`` URL);
    ``readonly`` for inspection only; ``retry_s``: how often an unwritable store tries again."""

    def __init__(self, location: Path | str, readonly: bool = False, retry_s: float = 30.0, migrate: bool = True):
        self.postgres = is_postgres(location)
        self.path: Path | None = None if self.postgres else Path(location)
        self._target = str(location)
        # What logs, stats and messages show: a PostgreSQL URL loses its password.
        self.location = redact(self._target) if self.postgres else str(self.path)
        self.readonly = readonly
        # migrate=False: a store its daemon opened and migrated already (a worker process), which
        # this process never migrates, moves aside or repairs: a damage found here is the daemon's
        # to repair, when its own next operation meets it
        self.repairs = migrate
        self.retry_s = retry_s
        self.counters: Counter = Counter()
        self.use = UseLock()
        self.generation = 0
        self.writable = not readonly
        self.problem: str | None = None  # why the store cannot be written, while it cannot
        self._mode = "ro" if readonly else "rw"  # how connections open: rw, ro, or immutable (ro without -shm)
        self._retry_at = 0.0
        self._state = threading.Lock()
        self._local = threading.local()
        self._open: list[Database] = []  # every thread's connection, so close() reaches them all
        self._open_lock = threading.Lock()
        try:
            if readonly or not migrate:
                self._open_to_read()
            else:
                if self.path is not None:
                    self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._open_to_write()
        except BaseException:
            self.close()  # a store that failed to open holds no connection
            raise

    # -- connections ----------------------------------------------------------------------
    def _db(self) -> Database:
        db = getattr(self._local, "db", None)
        if db is not None and (db.broken or db.generation != self.generation):
            self._forget(db)
            db = None
        if db is None:
            db = connect(self._target, self._mode != "rw", self._mode == "immutable")
            db.generation = self.generation
            self._local.db = db
            with self._open_lock:
                self._open.append(db)
        return db

    def _forget(self, db: Database) -> None:
        db.close()
        with self._open_lock:
            if db in self._open:
                self._open.remove(db)
        if getattr(self._local, "db", None) is db:
            self._local.db = None

    def close(self) -> None:
        """Close every thread's connection (the last SQLite one folds the WAL into the file)."""
        with self._open_lock:
            dbs, self._open = self._open, []
        for db in dbs:
            try:
                db.close()
            except Exception:  # noqa: BLE001 - closing is best effort; the next use reconnects
                log.debug("closing a store connection failed", exc_info=True)
        self._local = threading.local()

    # -- opening --------------------------------------------------------------------------
    def _open_to_read(self) -> None:
        if self.path is not None and not self.path.exists():
            raise StoreError(f"no store at {self.path} yet; it is created by the first plan")
        try:
            version = self._db().schema_version()
        except UnwritableStore:
            if self.path is None:
                raise
            self.close()  # the -shm cannot be made (a full disk): read the file as it is
            self._mode = "immutable"
            version = self._db().schema_version()
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.location} has schema version {version}, this Hypatia reads {SCHEMA_VERSION}; "
                "start the daemon of this version to create or migrate it"
            )

    def _open_to_write(self) -> None:
        try:
            self._db().migrate()
        except UnreadableStore as exc:
            if self.path is None:
                raise
            self.counters["store_corruptions"] += 1
            self._replace(exc, "at open")
        except UnwritableStore as exc:
            if self.path is None:
                raise
            self._serve_read_only(exc)

    def _serve_read_only(self, refused: UnwritableStore) -> None:
        """The file cannot be written: serve it read-only if it can be read, else say why not."""
        assert self.path is not None
        self.close()
        if not self.path.exists():
            raise StoreError(f"cannot create the store: {refused}")
        last: StoreError = refused
        for mode in ("ro", "immutable"):
            self._mode = mode
            try:
                db = self._db()
                version = db.schema_version()
                db.check()
                break
            except UnwritableStore as exc:
                self.close()
                last = exc
            except UnreadableStore as exc:
                raise StoreError(f"{exc}; it cannot be replaced either, as {refused.reason}") from None
        else:
            raise StoreError(f"cannot open the store: {last}")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.location} needs migrating to schema {SCHEMA_VERSION} but {refused}")
        self.writable, self.problem = False, refused.reason
        self._retry_at = time.monotonic() + self.retry_s
        log.warning("store %s cannot be written: %s; serving what it holds read-only, dropping new plans and "
                    "measurements, and trying again every %g s", self.location, refused.reason, self.retry_s)

    # -- a damaged file -------------------------------------------------------------------
    def repair(self, generation: int, exc: UnreadableStore) -> bool:
        """Replace the damaged file that an operation of ``generation`` ran into; whether the
        operation should run again (it should not on a store that cannot be repaired here)."""
        if self.readonly or self.path is None or not self.repairs:
            return False
        with self.use.exclusive():
            if self.generation != generation:
                return True  # another thread repaired it first (or the connections were replaced)
            self.counters["store_corruptions"] += 1
            self._replace(exc, "while running")
        return True

    def _replace(self, exc: UnreadableStore, when: str) -> None:
        """Move the damaged file aside and start a fresh store with the rows it still gives."""
        assert self.path is not None
        self.close()
        try:
            aside = salvage.move_aside(self.path)
        except OSError as refused:
            raise StoreError(f"the store {self.path} is damaged ({exc.detail}) and cannot be moved aside "
                             f"({refused.strerror}); stop hypatiad and move or delete the file") from None
        self.counters["store_quarantined"] += 1
        self.generation += 1
        self._mode = "rw"
        db = self._db()
        db.migrate()
        try:
            copied = salvage.copy_readable_rows(aside, db)
        except StoreError as again:  # the fresh store refused the rows: start it empty
            log.warning("store %s: copying the readable rows failed (%s); starting empty", self.location, again)
            copied = {}
        self.counters["rows_salvaged"] += sum(copied.values())
        self.writable, self.problem = True, None
        log.error("store %s is damaged (%s), found %s: moved aside to %s; %d readable rows copied into a fresh "
                  "store (%s)", self.location, exc.detail, when, aside, sum(copied.values()),
                  ", ".join(f"{t} {n}" for t, n in copied.items()) or "none")

    # -- an unwritable file ---------------------------------------------------------------
    def ready_to_write(self) -> bool:
        """Whether a write should be tried now: always while the store is writable; otherwise
        once every ``retry_s`` seconds, reopening the file for writing where it was read-only."""
        if self.writable:
            return True
        if self.readonly or self.use.held():
            return False
        with self._state:
            now = time.monotonic()
            if self.writable or now < self._retry_at:
                return self.writable
            self._retry_at = now + self.retry_s
        if self._mode == "rw":
            return True  # the connections can write: the write itself is the try
        with self.use.exclusive():
            if self._mode != "rw":
                was = self._mode
                self.close()
                self._mode, self.generation = "rw", self.generation + 1
                try:
                    self._db().migrate()
                except UnwritableStore as exc:
                    self.close()
                    self._mode = was
                    log.debug("store %s still cannot be written: %s", self.location, exc.reason)
                    return False
        return True

    def write_refused(self, exc: UnwritableStore) -> None:
        self.counters["store_writes_dropped"] += 1
        with self._state:
            if not self.writable:
                return
            self.writable, self.problem = False, exc.reason
            self._retry_at = time.monotonic() + self.retry_s
        log.warning("store %s cannot be written: %s; serving what it holds read-only, dropping new plans and "
                    "measurements, and trying again every %g s", self.location, exc.reason, self.retry_s)

    def wrote(self) -> None:
        if self.writable:
            return
        with self._state:
            if self.writable:
                return
            self.writable, self.problem = True, None
        log.warning("store %s is writable again (%d writes were dropped while it was not)", self.location,
                    self.counters["store_writes_dropped"])

    def health(self) -> dict[str, Any]:
        """The store's state and trouble counters, for stats."""
        return {
            "writable": self.writable,
            "problem": self.problem,
            "writes_dropped": self.counters["store_writes_dropped"],
            "corruptions": self.counters["store_corruptions"],
            "files_quarantined": self.counters["store_quarantined"],
            "rows_salvaged": self.counters["rows_salvaged"],
        }
