"""Peer credentials through ZAP: only processes of the daemon's own user may talk to it.

For every ipc connection libzmq reads the peer's SO_PEERCRED and hands ``uid:gid:pid`` to the
ZAP handler at the end of the request's address frame (RFC 27). This handler accepts the
daemon's own uid and refuses any other before a single message is read. The 0700 runtime
directory already keeps other users away from the socket; this is the second lock, for a
directory or socket whose mode was loosened by hand. Where the platform gives no credentials
the peer is accepted (the directory still guards) and counted as unverified.

The optional TCP listener has a domain of its own: there only the CURVE mechanism is let
through, and only for a client public key admitted with ``hypatia-ctl keys --client``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

from pathlib import Path

import zmq
from zmq.utils import z85

from hypatia.keys import admitted

log = logging.getLogger("hypatia.daemon")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27
DOMAIN = b"hypatia"
TCP_DOMAIN = b"hypatia-tcp"
COUNTERS = ("accepted", "refused", "unverified", "malformed", "curve_accepted", "curve_refused")


def peer_uid(address: bytes) -> int | None:
    """The uid in a ZAP address of the form ``[path]:uid:gid:pid``, or None without one."""
    parts = address.decode("utf-8", "replace").rsplit(":", 3)
    if len(parts) != 4 or not parts[1].isdigit():
        return None
    return int(parts[1])


class ZapHandler(threading.Thread):
    """Answers the context's ZAP requests until :meth:`stop`; ``counters`` holds the outcomes."""

    def __init__(self, ctx: zmq.Context, uid: int, keys_dir: Path | None = None):
        super().__init__(name="hypatiad-zap", daemon=True)
        self.uid = uid
        self.keys_dir = keys_dir
        self.counters: Counter = Counter()
        self._stop_event = threading.Event()
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)

    def decide(self, address: bytes) -> tuple[bytes, bytes]:
        uid = peer_uid(address)
        if uid is None:
            self.counters["unverified"] += 1
            return b"200", b"OK (no peer credentials on this platform)"
        if uid == self.uid:
            self.counters["accepted"] += 1
            return b"200", b"OK"
        self.counters["refused"] += 1
        log.warning("refused a connection from uid %d (this daemon serves uid %d only)", uid, self.uid)
        return b"400", f"uid {uid} is not this daemon's user".encode()

    def decide_curve(self, mechanism: bytes, credentials: list[bytes]) -> tuple[bytes, bytes, bytes]:
        """(status, text, user id) for a connection to the TCP listener."""
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32 or self.keys_dir is None:
            self.counters["curve_refused"] += 1
            log.warning("refused a TCP connection without CURVE (mechanism %s)", mechanism.decode("ascii", "replace"))
            return b"400", b"CURVE required", b""
        key = z85.encode(credentials[0])
        name = admitted(self.keys_dir).get(key)  # read per handshake, so a revocation takes effect at once
        if name is None:
            self.counters["curve_refused"] += 1
            log.warning("refused a TCP connection with a CURVE key that is not admitted (%s)", key.decode())
            return b"400", b"client key not admitted", b""
        self.counters["curve_accepted"] += 1
        log.info("admitted TCP client %s", name)
        return b"200", b"OK", name.encode()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop_event.is_set():
            if not poller.poll(100):
                continue
            frames = self.sock.recv_multipart()
            if len(frames) < 6 or frames[0] != b"1.0":
                self.counters["malformed"] += 1
                self.sock.send_multipart([b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"malformed ZAP request", b"", b""])
                continue
            user = b""
            try:
                if frames[2] == TCP_DOMAIN:
                    status, text, user = self.decide_curve(frames[5], frames[6:])
                else:
                    status, text = self.decide(frames[3])
            except Exception:  # noqa: BLE001 - a failed check refuses the peer; it never stops the handler
                log.exception("ZAP check failed; refusing the peer")
                self.counters["malformed"] += 1
                status, text = b"500", b"authentication check failed"
            self.sock.send_multipart([b"1.0", frames[1], status, text, user, b""])
        self.sock.close(linger=0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=2)
