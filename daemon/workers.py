"""Planning and tuning run in worker processes (:mod:`hypatia.daemon.worker`), not in the daemon.

A planning of a hostile or huge graph, or a tuning that allocates past the machine's memory,
then costs at most its worker: a job that runs past its deadline is killed with its process
(and its memory), a worker that dies fails only its job, and a stopping daemon kills its
workers instead of waiting on work it cannot interrupt. Workers are persistent and started
ahead of need, so a job does not pay for a process start; one that is killed or dies is
replaced, and one that has grown large is recycled after its job.

The daemon's pool threads call :meth:`WorkerPool.run`, which blocks on the worker's pipe; the
server thread calls :meth:`WorkerPool.stop`.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import msgpack

from hypatia.daemon.worker import HEADER

log = logging.getLogger("hypatia.daemon")

RECYCLE_RSS_BYTES = 1 << 30  # a worker this large after a job is replaced by a fresh one
MAX_REPLY_BYTES = 1 << 30


class WorkerFailed(Exception):
    """A job failed in its worker; the message says why. ``skip``: not ours to do (another
    environment); ``transient``: the store failed, not the job; ``damaged``: the store's file is
    damaged, for the daemon to repair; ``counters``: what it counted."""

    def __init__(self, message: str, *, skip: bool = False, transient: bool = False, damaged: bool = False,
                 counters: dict | None = None):
        super().__init__(message)
        self.skip, self.transient, self.damaged, self.counters = skip, transient, damaged, counters or {}


class WorkerDied(WorkerFailed):
    """The worker process died during the job (killed, out of memory, crashed)."""


class JobDeadline(WorkerFailed):
    """The job ran past its deadline; its worker was killed."""


class WorkerStopped(WorkerFailed):
    """The daemon is stopping and killed the worker: the job was cancelled, not at fault."""


def _how(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class Worker:
    """One worker process and its pipes."""

    def __init__(self, kind: str):
        self.kind = kind
        self.proc = subprocess.Popen([sys.executable, "-m", "hypatia.daemon.worker", kind], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0, close_fds=True)
        self.pid = self.proc.pid
        self.ready = False
        self.stopping = False
        self._buffer = bytearray()

    def _recv(self, deadline: float) -> dict | None:
        """The next frame, or None at the deadline; raises EOFError when the worker is gone."""
        fd = self.proc.stdout.fileno()
        while True:
            if len(self._buffer) >= HEADER.size:
                (size,) = HEADER.unpack_from(self._buffer)
                if size > MAX_REPLY_BYTES:
                    raise EOFError(f"a reply of {size} bytes")
                if len(self._buffer) >= HEADER.size + size:
                    frame = bytes(self._buffer[HEADER.size:HEADER.size + size])
                    del self._buffer[:HEADER.size + size]
                    return msgpack.unpackb(frame, raw=False, strict_map_key=False)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], min(left, 1.0))
            if readable:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise EOFError("end of pipe")
                self._buffer += chunk

    def _send(self, obj: Any) -> None:
        data = msgpack.packb(obj, use_bin_type=True)
        view = memoryview(HEADER.pack(len(data)) + data)
        fd = self.proc.stdin.fileno()
        while view:
            view = view[os.write(fd, view):]

    def _gone(self, during: str) -> WorkerFailed:
        """The exception for a worker whose pipe closed: stopped by the daemon, or died."""
        self.kill()
        if self.stopping:
            return WorkerStopped(f"the {self.kind} worker was stopped with the daemon {during}")
        return WorkerDied(f"the {self.kind} worker (pid {self.pid}) died {during} ({_how(self.proc.returncode)}); "
                          "see the daemon log")

    def call(self, request: dict, timeout_s: float, start_timeout_s: float) -> dict:
        """Send one job and return the worker's reply; raises :class:`WorkerFailed` subclasses
        when the worker dies, is stopped, or runs past ``timeout_s`` (then it is killed)."""
        try:
            if not self.ready:
                hello = self._recv(time.monotonic() + start_timeout_s)
                if hello is None:
                    self.kill()
                    raise WorkerDied(f"the {self.kind} worker did not start within {start_timeout_s:.0f} s")
                self.ready = True
            self._send(request)
            reply = self._recv(time.monotonic() + timeout_s)
        except (EOFError, OSError, ValueError, msgpack.UnpackException):
            raise self._gone("during its job" if self.ready else "while starting") from None
        if reply is None:
            self.kill()
            raise JobDeadline(f"the {self.kind} job ran past its deadline of {timeout_s:g} s; its worker was killed")
        return reply

    def kill(self) -> None:
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._close_pipes()

    def close(self) -> None:
        """Let an idle worker exit on its own (end of its stdin), else kill it."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class WorkerPool:
    """Worker processes of one kind, shared by the daemon's pool threads: each job takes an idle
    worker (starting one if none is idle) and gives it back. ``keep`` workers are started at
    once and replaced when they die."""

    def __init__(self, kind: str, start_timeout_s: float, keep: int = 0):
        self.kind = kind
        self.start_timeout_s = start_timeout_s
        self.keep = keep
        self.counters: Counter = Counter()
        self.stopping = False
        self._lock = threading.Lock()
        self._idle: list[Worker] = []
        self._all: set[Worker] = set()
        self._replenish()

    def _spawn(self) -> Worker:
        worker = Worker(self.kind)
        self.counters["started"] += 1
        self._all.add(worker)
        return worker

    def _replenish(self) -> None:
        """Start workers until ``keep`` are alive (under the lock or from __init__)."""
        while not self.stopping and len(self._all) < self.keep:
            self._idle.append(self._spawn())

    def _take(self) -> Worker:
        with self._lock:
            if self.stopping:
                raise WorkerStopped(f"the daemon is stopping: no {self.kind} job starts")
            return self._idle.pop() if self._idle else self._spawn()

    def _drop(self, worker: Worker) -> None:
        with self._lock:
            self._all.discard(worker)
            self._replenish()

    def run(self, request: dict, timeout_s: float) -> tuple[Any, dict]:
        """Run one job in a worker: its result and the counters it added. Raises
        :class:`WorkerFailed` (or a subclass) when the job fails, dies, is stopped or runs past
        ``timeout_s``."""
        worker = self._take()
        try:
            reply = worker.call(request, timeout_s, self.start_timeout_s)
        except WorkerFailed as exc:
            self.counters[type(exc).__name__] += 1
            self._drop(worker)
            raise
        if reply.get("rss", 0) > RECYCLE_RSS_BYTES:
            log.info("recycling the %s worker (pid %d): %d MiB after its job", self.kind, worker.pid, reply["rss"] >> 20)
            self.counters["recycled"] += 1
            worker.close()
            self._drop(worker)
        else:
            with self._lock:
                if self.stopping:
                    worker.kill()
                    self._all.discard(worker)
                else:
                    self._idle.append(worker)
        if reply.get("ok"):
            return reply.get("result"), reply.get("counters") or {}
        raise WorkerFailed(str(reply.get("error", "the job failed")), skip=bool(reply.get("skip")),
                           transient=bool(reply.get("transient")), damaged=bool(reply.get("damaged")),
                           counters=reply.get("counters"))

    def stop(self) -> None:
        """Kill every worker: an idle one at once, a busy one's process only, so that the thread
        waiting on it sees its pipe close and ends the job with :class:`WorkerStopped`."""
        with self._lock:
            self.stopping = True
            idle, self._idle = self._idle, []
            busy = [w for w in self._all if w not in idle]
            self._all = set(busy)
        for worker in idle:
            worker.kill()
        for worker in busy:
            worker.stopping = True
            try:
                worker.proc.kill()
            except ProcessLookupError:
                pass

    def pids(self) -> list[int]:
        with self._lock:
            return sorted(w.pid for w in self._all)
