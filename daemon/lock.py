"""One daemon per socket: an flock'd pid file beside the socket (an ipc bind would silently steal)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class AlreadyRunning(Exception):
    """Another hypatiad holds the lock for this runtime directory."""

    def __init__(self, pid: int | None, lock_path: Path):
        who = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"hypatiad is already running ({who}, lock {lock_path}); it keeps serving. "
            "Use `hypatiad stop` first, or set HYPATIA_HOME to run a separate daemon"
        )
        self.pid = pid


class PidLock:
    """Exclusive, non-blocking lock; released by the kernel when the holder dies, even by SIGKILL."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = int(os.read(fd, 32).split()[0])
            except (ValueError, IndexError):
                pid = None
            os.close(fd)
            raise AlreadyRunning(pid, self.path) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
