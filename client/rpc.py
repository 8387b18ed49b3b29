"""The client's side of the wire: a DEALER socket with deadlines and bounded retries.

Lazy Pirate: send, poll until the deadline, and on silence close the socket, open a fresh one
(handshaking again) and retry, at most ``config.retries`` times; then :class:`DaemonUnavailable`.
A request the daemon acknowledges with ``pending`` replies (a plan being made) may wait longer:
each one moves the deadline to a full timeout later, up to the caller's ``wait_s`` from the
start of the call, so a loaded daemon that keeps working is waited for, and one that dies or
falls silent costs no more than its usual deadline after its last word.
A process that forks gets a new context and socket in the child; the parent's are never reused.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import threading
import time
from typing import Any

import zmq

from hypatia import __version__
from hypatia.config import Config, read_daemon_pid
from hypatia.keys import KeysError, load_client_keys
from hypatia.protocol import (
    PROGRESS_EVERY_S,
    PROTOCOL_VERSION,
    ErrorCode,
    ProtocolError,
    RemoteError,
    VersionMismatch,
    decode_reply,
    encode_request,
)


class DaemonUnavailable(Exception):
    """No daemon answered in time (not running, hung, or gone); the caller plans locally."""


class DaemonGone(DaemonUnavailable):
    """No daemon process is alive for the socket (never started, stopped, or killed)."""


class GaveUpWaiting(DaemonUnavailable):
    """The daemon acknowledged the request and kept working on it past the caller's ``wait_s``."""


class VersionSkew(Exception):
    """The daemon speaks another protocol version; talking to it is pointless until one upgrades."""


# While a reply is late, check this often whether the daemon process still exists.
LIVENESS_SLICE_MS = 50
# After an acknowledgement, the silence that means the daemon stopped working on the request.
SILENCE_AFTER_ACK_S = 4 * PROGRESS_EVERY_S


class DaemonClient:
    """A thread-safe connection to hypatiad for one process."""

    def __init__(self, config: Config, timeout_ms: int | None = None, retries: int | None = None):
        self.config = config
        self.acknowledged = False  # whether the daemon said "pending" during the last call
        self.timeout_ms = config.timeout_ms if timeout_ms is None else timeout_ms
        self.retries = config.retries if retries is None else retries
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pid = os.getpid()
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self.server: dict | None = None

    # -- sockets --------------------------------------------------------------------------
    def _fresh_after_fork(self) -> None:
        if self._pid != os.getpid():
            # The parent's context and socket belong to the parent; drop them without closing.
            self._ctx, self._sock, self.server = None, None, None
            self._pid = os.getpid()
            self._lock = threading.Lock()

    def _open(self) -> zmq.Socket:
        if self._ctx is None:
            self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        if self.config.remote:
            keys = load_client_keys(self.config.client_keys)
            sock.curve_serverkey = keys.server_public
            sock.curve_publickey = keys.public
            sock.curve_secretkey = keys.secret
        sock.connect(self.config.client_endpoint)
        return sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock, self.server = None, None

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                self._reset()
                if self._ctx is not None:
                    self._ctx.term()
            self._ctx = None

    # -- requests -------------------------------------------------------------------------
    def _exchange(self, sock: zmq.Socket, method: str, body: dict, deadline: float, timeout: float = 0.0,
                  wait_until: float = 0.0) -> Any:
        rid = next(self._ids)
        try:
            sock.send(encode_request(rid, method, body), zmq.NOBLOCK)
        except zmq.Again:
            raise TimeoutError(f"{method}: the send queue is full") from None
        waited = False  # whether an acknowledgement moved the deadline
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                if waited:
                    raise TimeoutError(f"{method}: acknowledged, then no word from hypatiad for "
                                       f"{max(timeout, SILENCE_AFTER_ACK_S) * 1000:.0f} ms")
                raise TimeoutError(f"{method}: no reply within {self.timeout_ms} ms")
            # Wait in slices: a late reply is the moment to notice a daemon that died.
            if not sock.poll(min(left_ms, LIVENESS_SLICE_MS), zmq.POLLIN):
                if not self.config.remote and read_daemon_pid(self.config) is None:
                    raise DaemonGone(f"hypatiad exited while answering {method}")
                continue
            reply = decode_reply(sock.recv(), self.config.max_message_bytes)
            if reply.request_id != rid:
                continue  # a late reply to an earlier, abandoned request: ignore it
            if not reply.pending:
                return reply.result()
            # The daemon works on it: wait for its next word a full timeout (at least a few of
            # its progress intervals, however short the timeout), never past wait_until.
            self.acknowledged = True
            later = min(time.monotonic() + max(timeout, SILENCE_AFTER_ACK_S), wait_until)
            if later > deadline:
                deadline, waited = later, True

    def _handshake(self, sock: zmq.Socket, deadline: float) -> None:
        body = {
            "protocol": PROTOCOL_VERSION,
            "version": __version__,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "program": " ".join(sys.argv)[:200],
        }
        try:
            self.server = self._exchange(sock, "hello", body, deadline)
        except RemoteError as exc:
            if exc.code == ErrorCode.VERSION_MISMATCH:
                raise VersionSkew(str(exc)) from None
            raise

    def call(self, method: str, body: dict | None = None, timeout_ms: int | None = None,
             retries: int | None = None, wait_s: float = 0.0) -> Any:
        """Send one request and return its result; raises :class:`DaemonUnavailable` when the
        daemon is down or silent past every retry, :class:`VersionSkew` at once when it speaks
        another protocol version, :class:`RemoteError` for an error reply. ``retries=0`` for a
        request that must not be served twice (a remote run). While the daemon acknowledges the
        request as in progress, wait up to ``wait_s`` from now (:class:`GaveUpWaiting` after)."""
        timeout = (self.timeout_ms if timeout_ms is None else timeout_ms) / 1000
        retries = self.retries if retries is None else retries
        self._fresh_after_fork()
        with self._lock:
            self.acknowledged = False
            wait_until = time.monotonic() + wait_s
            last: Exception | None = None
            attempts, attempt, rehandshaken = 1 + retries, 0, False
            while attempt < attempts:
                attempt += 1
                deadline = time.monotonic() + timeout
                try:
                    if self._sock is None:
                        # Checked only when connecting: the hot path stays one send and one recv.
                        if not self.config.remote and read_daemon_pid(self.config) is None:
                            raise DaemonGone(f"no hypatiad is running for {self.config.endpoint}")
                        self._sock = self._open()
                        self._handshake(self._sock, deadline)
                    return self._exchange(self._sock, method, body or {}, deadline, timeout, wait_until)
                except (VersionSkew, DaemonGone):
                    self._reset()
                    raise
                except KeysError as exc:  # retrying cannot help: the key file itself is wrong
                    self._reset()
                    raise DaemonUnavailable(str(exc)) from None
                except VersionMismatch as exc:
                    # The reply is framed in another protocol version (the daemon's refusal of our
                    # hello, as a daemon of another release frames it): retrying cannot help.
                    self._reset()
                    raise VersionSkew(f"hypatiad at {self.config.client_endpoint} speaks another protocol ({exc}); "
                                      "upgrade the older side and restart the daemon") from None
                except RemoteError as exc:
                    if exc.code == ErrorCode.VERSION_MISMATCH:
                        self._reset()
                        raise VersionSkew(str(exc)) from None
                    if exc.code in (ErrorCode.SHUTTING_DOWN, ErrorCode.NOT_HANDSHAKEN):
                        self._reset()
                        last = exc
                        if exc.code == ErrorCode.NOT_HANDSHAKEN and not rehandshaken:
                            # a restarted daemon at the same address: the request was not served, so
                            # even one that must not be sent twice goes once more, after a hello
                            rehandshaken, attempts = True, attempts + 1
                        continue
                    raise
                except (TimeoutError, ProtocolError, zmq.ZMQError) as exc:
                    self._reset()
                    last = exc
                    if wait_s and self.acknowledged and time.monotonic() >= wait_until:
                        raise GaveUpWaiting(
                            f"hypatiad was still working on {method} after {wait_s:.0f} s (HYPATIA_PLAN_WAIT_S)"
                        ) from None
            raise DaemonUnavailable(
                f"hypatiad at {self.config.client_endpoint} did not answer {method} after "
                f"{attempt} attempt(s): {last}"
            )
