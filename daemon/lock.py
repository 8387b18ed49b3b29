"""One daemon per socket and one per store: flock'd pid files, released by the kernel on death.

The runtime lock sits beside the socket (an ipc bind would silently steal the path). The store
lock sits beside a SQLite store file and names the socket of the daemon holding it, so that a
second daemon started from another runtime directory (or after the runtime directory was
removed) cannot open the same file: a SQLite store has exactly one writer. A PostgreSQL store
is shared by several daemons by design and has no store lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from hypatia.config import Config


class AlreadyRunning(Exception):
    """Another hypatiad holds the lock for this runtime directory."""

    def __init__(self, pid: int | None, lock_path: Path):
        who = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"hypatiad is already running ({who}, lock {lock_path}); it keeps serving. "
            "Use `hypatiad stop` first, or set HYPATIA_HOME to run a separate daemon"
        )
        self.pid = pid


class StoreLocked(AlreadyRunning):
    """Another hypatiad, of another runtime directory, serves this SQLite store."""

    def __init__(self, pid: int | None, lock_path: Path, store: Path, endpoint: str | None):
        who = f"pid {pid}" if pid else "another process"
        where = f", serving {endpoint}" if endpoint else ""
        Exception.__init__(
            self,
            f"the store {store} is in use by another hypatiad ({who}{where}; lock {lock_path}); a SQLite "
            "store has one daemon at a time. Stop that daemon (`hypatiad stop` with its environment, or "
            f"`kill {pid or 'PID'}`), or give this one its own store (HYPATIA_HOME or XDG_CACHE_HOME)",
        )
        self.pid = pid
        self.endpoint = endpoint


def read_holder(path: Path) -> tuple[int | None, str | None]:
    """The pid and note written in the lock file ``path`` (either may be None)."""
    try:
        fields = path.read_text().split(maxsplit=1)
    except OSError:
        return None, None
    try:
        pid = int(fields[0]) if fields else None
    except ValueError:
        pid = None
    return pid, (fields[1].strip() or None) if len(fields) > 1 else None


def _lock_fd(path: Path) -> tuple[int, bool]:
    """A descriptor to flock for ``path`` and whether it can take the holder's note. Where the
    directory cannot be written (read-only, immutable, full), an existing lock file is locked
    read-only, else the directory itself: every daemon on that store makes the same choice, so
    the lock still excludes."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), True
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
    except FileNotFoundError:
        return os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), False


class PidLock:
    """Exclusive, non-blocking lock; released by the kernel when the holder dies, even by SIGKILL.
    The file holds the holder's pid, then an optional note (the store lock: the holder's socket)."""

    def __init__(self, path: Path, note: str = ""):
        self.path = path
        self.note = note
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; whether it was."""
        fd, writable = _lock_fd(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        if writable:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n{self.note}\n".encode() if self.note else f"{os.getpid()}\n".encode(), 0)
            except OSError:  # a full disk: the holder's note is for messages only, the lock holds
                pass
        self._fd = fd
        return True

    def acquire(self) -> None:
        if not self.try_acquire():
            raise AlreadyRunning(read_holder(self.path)[0], self.path)

    def still_ours(self) -> bool:
        """Whether the lock file at ``path`` is still the file this lock holds (not removed or
        replaced under it, e.g. with its whole directory)."""
        if self._fd is None:
            return False
        try:
            here, held = os.stat(self.path), os.fstat(self._fd)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:  # opened read-only (see _lock_fd): nothing of ours to clear
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def store_lock_path(config: Config) -> Path | None:
    """The lock file of ``config``'s store: beside a SQLite file; None for PostgreSQL."""
    if config.store_url:
        return None
    return config.store_path.with_name(config.store_path.name + ".lock")


def acquire_store_lock(config: Config, wait_s: float, poll_s: float = 0.05) -> PidLock | None:
    """Hold the store lock for this daemon's life (None for a PostgreSQL store).

    A holder that serves another socket that still exists is a live daemon: :class:`StoreLocked`
    at once. A holder whose socket is gone, or is our own path (its runtime directory was
    removed under it, and ours was made anew), is on its way out (see the server's socket
    watch): wait for it up to ``wait_s`` seconds, then :class:`StoreLocked`."""
    path = store_lock_path(config)
    if path is None:
        return None
    lock = PidLock(path, note=config.endpoint)
    deadline = time.monotonic() + wait_s
    while not lock.try_acquire():
        pid, endpoint = read_holder(path)
        socket = Path(endpoint.removeprefix("ipc://")) if endpoint and endpoint.startswith("ipc://") else None
        leaving = socket is not None and (socket == config.socket_path or not socket.exists())
        if not leaving or time.monotonic() > deadline:
            raise StoreLocked(pid, path, config.store_path, endpoint)
        time.sleep(poll_s)
    return lock


class SocketWatch:
    """Whether a serving daemon's socket and runtime lock file are still the ones it made. When
    either is removed or replaced (its runtime directory deleted, say), no new client can reach
    the daemon, and a client would start a second one: the daemon must leave."""

    def __init__(self, socket: Path, lock: PidLock):
        self.socket = socket
        self.lock = lock
        info = os.stat(socket)
        self._id = (info.st_dev, info.st_ino)

    def socket_ours(self) -> bool:
        """Whether the socket path is still the socket this daemon bound."""
        try:
            info = os.stat(self.socket)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self._id

    def lost(self) -> str | None:
        """None while both are ours; else what happened to them, for the log."""
        try:
            info = os.stat(self.socket)
        except FileNotFoundError:
            return f"its socket {self.socket} was removed"
        except OSError as exc:
            return f"its socket {self.socket} cannot be seen ({exc.strerror})"
        if (info.st_dev, info.st_ino) != self._id:
            return f"its socket {self.socket} was replaced by another"
        if not self.lock.still_ours():
            return f"its lock file {self.lock.path} was removed or replaced"
        return None
