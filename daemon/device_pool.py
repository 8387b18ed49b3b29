"""The hypatia device's buffers in hypatiad: per client session and handle, shared ones kept
once per content digest and reference-counted, under one memory limit (see
:mod:`hypatia.daemon.device` for the requests that use them)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from hypatia.protocol import BadRequest, TooLarge


class DeviceFull(TooLarge):
    """The buffers a request would add do not fit under the device's memory limit."""


class UnknownHandle(BadRequest):
    """A handle this session does not hold (released, or the daemon restarted since)."""


class UnknownSession(BadRequest):
    """A session this daemon does not know: it restarted (or swept the session as dead) since
    the client made it, so the client's tensors are gone."""


@dataclass
class Buffer:
    """One tensor in the pool; ``refs`` counts the handles naming it (shared buffers only)."""

    tensor: Any
    nbytes: int
    digest: str | None = None
    refs: int = 1


@dataclass
class Session:
    token: str
    pid: int | None  # a client on this host; None over TCP
    handles: dict[int, Buffer] = field(default_factory=dict)
    seen: float = 0.0


def nbytes_of(tensor: Any) -> int:
    return tensor.untyped_storage().nbytes() if tensor.numel() else 0


class DevicePool:
    """Every buffer of the device, by session and handle; thread-safe."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.used = 0
        self.held_by_executors = 0  # captured graphs' copies of their inputs and their memory pools
        self.held_by_runs = 0  # what graphs running now may allocate (their footprints)
        self.sessions: dict[str, Session] = {}
        self.shared: dict[str, Buffer] = {}
        self.counters: Counter = Counter()
        self._lock = threading.Lock()

    def session(self, token: str, pid: int | None, create: bool = False) -> Session:
        with self._lock:
            found = self.sessions.get(token)
            if found is None:
                if not create:
                    raise UnknownSession(
                        "this hypatia device session is unknown to hypatiad (it restarted, or dropped the session "
                        "of a client it took for dead): the tensors on the device are lost")
                found = self.sessions[token] = Session(token, pid)
                self.counters["sessions_opened"] += 1
            found.seen = time.monotonic()
            return found

    def reserve(self, nbytes: int, what: str) -> None:
        """:class:`DeviceFull` unless ``nbytes`` more fit under the limit."""
        in_use = self.used + self.held_by_executors + self.held_by_runs
        if self.limit and in_use + nbytes > self.limit:
            self.counters["full"] += 1
            raise DeviceFull(
                f"the hypatia device is full: {what} needs {mib(nbytes)} more, {mib(in_use)} of "
                f"{mib(self.limit)} are in use (HYPATIA_DEVICE_MEMORY_MB). Free device tensors (del them, or "
                "move models back with model.to('cpu')) or start hypatiad with a larger HYPATIA_DEVICE_MEMORY_MB")

    def hold_for_executor(self, nbytes: int, what: str) -> Callable[[], None]:
        """Count ``nbytes`` an executor keeps (a captured graph) against the limit; what gives
        them back when it goes. :class:`DeviceFull` when they do not fit."""
        return self._hold("held_by_executors", nbytes, what)

    def hold(self, nbytes: int, what: str) -> Callable[[], None]:
        """Count ``nbytes`` that a graph about to run may allocate, until what is returned is
        called (when it has run): :class:`DeviceFull` now when they do not fit."""
        return self._hold("held_by_runs", nbytes, what)

    def _hold(self, kind: str, nbytes: int, what: str) -> Callable[[], None]:
        with self._lock:
            self.reserve(nbytes, what)
            setattr(self, kind, getattr(self, kind) + nbytes)

        def give_back() -> None:
            with self._lock:
                setattr(self, kind, getattr(self, kind) - nbytes)
        return give_back

    def get(self, session: Session, handle: int) -> Any:
        found = session.handles.get(handle)
        if found is None:
            raise UnknownHandle(f"handle {handle} is not held by this session (released, or never made)")
        return found.tensor

    def adopt(self, session: Session, handle: int, digest: str) -> bool:
        """Name the shared buffer of ``digest`` ``handle``; False if there is none."""
        with self._lock:
            found = self.shared.get(digest)
            if found is None:
                return False
            found.refs += 1
            self._bind(session, handle, found)
            self.counters["uploads_shared"] += 1
            self.counters["bytes_not_moved"] += found.nbytes
            return True

    def put(self, session: Session, handle: int, tensor: Any, digest: str | None = None) -> None:
        """Keep ``tensor`` under ``handle`` (shared under ``digest`` when given, and when another
        upload of the same content got there first, that buffer is named instead)."""
        nbytes = nbytes_of(tensor)
        with self._lock:
            if digest is not None and digest in self.shared:
                found = self.shared[digest]
                found.refs += 1
                self._bind(session, handle, found)
                return
            buf = Buffer(tensor, nbytes, digest)
            self.used += nbytes
            self.counters["buffers_made"] += 1
            if digest is not None:
                self.shared[digest] = buf
            self._bind(session, handle, buf)

    def _bind(self, session: Session, handle: int, buf: Buffer) -> None:
        old = session.handles.get(handle)
        session.handles[handle] = buf
        if old is not None:
            self._drop(old)

    def release(self, session: Session, handles: list[int]) -> int:
        with self._lock:
            n = 0
            for h in handles:
                buf = session.handles.pop(h, None)
                if buf is not None:
                    self._drop(buf)
                    n += 1
            self.counters["released"] += n
            return n

    def close(self, token: str) -> int:
        """Drop a session and every handle it holds; how many handles that was."""
        with self._lock:
            session = self.sessions.pop(token, None)
            if session is None:
                return 0
            for buf in session.handles.values():
                self._drop(buf)
            self.counters["sessions_closed"] += 1
            return len(session.handles)

    def _drop(self, buf: Buffer) -> None:
        buf.refs -= 1
        if buf.refs > 0:
            return
        self.used -= buf.nbytes
        self.counters["buffers_freed"] += 1
        if buf.digest is not None and self.shared.get(buf.digest) is buf:
            del self.shared[buf.digest]
        buf.tensor = None

    def sweep(self, alive: Callable[[int], bool], idle_s: float) -> list[str]:
        """Close the sessions of clients that died (same host) or went silent (TCP)."""
        now = time.monotonic()
        with self._lock:
            dead = [t for t, s in self.sessions.items()
                    if (s.pid is not None and not alive(s.pid)) or (s.pid is None and now - s.seen > idle_s)]
        for token in dead:
            self.close(token)
        self.counters["sessions_swept"] += len(dead)
        return dead

    def stats(self) -> dict:
        with self._lock:
            return {"memory_used_bytes": self.used, "memory_limit_bytes": self.limit,
                    "memory_held_by_executors_bytes": self.held_by_executors,
                    "sessions": len(self.sessions), "shared_buffers": len(self.shared),
                    "handles": sum(len(s.handles) for s in self.sessions.values())} | dict(self.counters)


def mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"
