"""The wire protocol between the client hook and hypatiad: one msgpack frame per message.

A request is ``[PROTOCOL_VERSION, request_id, method, body]``; a reply is
``[PROTOCOL_VERSION, request_id, status, body]`` with status ``"ok"`` or ``"error"`` and, for
errors, ``body = {"code": int, "message": str}``. A request whose work takes a while (a
``make_plan`` miss being planned) first gets interim replies of status ``"pending"``, at once
and then every :data:`PROGRESS_EVERY_S` while the work runs, before its one final reply. Only msgpack's plain types travel: nothing is
ever unpickled or executed. The protocol is versioned apart from the package; a peer speaking
another version is refused at the handshake with :data:`ErrorCode.VERSION_MISMATCH`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgpack

# 2: plans are recipe format 3 (the executor decision), reports carry executor choices and
# region-keyed verdicts, workloads name their phase.
# 3: "pending" interim replies to a make_plan being planned; the hello reply names the daemon
# (``daemon``, an id of 8 characters of [0-9a-z]) and every shared-memory segment carries it.
# 4: compiled code: get_compiled, put_compiled, compile_heartbeat, compile_release, warm_start.
PROTOCOL_VERSION = 5

# How often the daemon tells a client waiting on planning that the work is still in progress.
PROGRESS_EVERY_S = 0.5

# Methods the daemon answers. `hello` must come first on every connection.
METHODS = ("hello", "ping", "get_plan", "make_plan", "report", "stats", "tune", "tune_status", "flush",
           "get_compiled", "put_compiled", "compile_heartbeat", "compile_release", "warm_start", "device")

# Compiled code (hypatia/daemon/compiles.py). An artifact is the bytes of Inductor's caches for one
# graph (``torch.compiler.save_cache_artifacts``), keyed by ``key`` (``c1-`` and 64 hex digits,
# made by the client from the plan keys, the executor candidate, the device index, a digest of
# the compiler's versions and settings and of what Inductor was given) and checked by ``digest``
# (sha256 of ``content``).
# - ``get_compiled`` {key, holder, claim}: {"artifact": {content, digest}} on a hit; on a miss with
#   ``claim``, {"compile": true, "heartbeat_s": s} (this client compiles it: single flight) or
#   {"wait": true, "holder": who, "retry_ms": ms} (another client is compiling it); {} otherwise,
#   and to a client over TCP where it would be told to compile (its artifact would be refused).
# - ``compile_heartbeat`` {holder, keys}: the holder is still compiling these; a claim with no
#   heartbeat for three heartbeats is given to the next client that asks.
# - ``put_compiled`` {key, holder, content, digest, graph_key, workload_key, env_key, candidate,
#   device_index, source_key, direct}: stored (the claim is released; a put refused ends the
#   claim too); only from this host's own user (the private ipc socket), never over TCP.
# - ``compile_release`` {key, holder}: the compile failed; the next client that asks compiles.
# - ``warm_start`` {source_key, env_key, device_index, candidate}: the artifact a
#   graph compiled straight from Dynamo's graph can start from without being traced again, with
#   the candidate its plan chose and the plan: {"artifact", "candidate", "keys", "plan"} or {}.

# `device` (the hypatia device, hypatia/daemon/device.py): body ``{"op", "session", ...}`` with op
# ``info``, ``upload`` {tensors, tag}, ``execute`` {graph_key, workload_key, env_key, inputs, outputs,
# fetch, release, out_bytes, tag}, ``fetch`` {handles, tag}, ``release`` {handles} or ``close``;
# ``session`` is the client's random token (16 to 32 hex digits), ``pid`` its process on this host.
# On this host tensors travel through shared memory (hypatia/shm.py): a descriptor of a segment of
# that client and of this daemon (the ``daemon`` id of its hello reply), tagged ``<tag>u<k>`` up and
# ``<tag>o<k>`` down, which the client unlinks (the daemon sweeps those of a client that died); or
# as CUDA IPC handles where the client has the daemon's GPU; over TCP inline as
# ``{"bytes", "dtype", "shape"}``. Malformed descriptors are BAD_REQUEST. Remote mode
# (HYPATIA_MODE=remote) is a client of these requests too: ``run``, its own path until protocol 5,
# is gone, and an old client's ``run`` is refused as an unknown method (it then runs locally).
# A full device is TOO_LARGE, a session the daemon does not know BAD_REQUEST with a message that
# says the device's tensors are lost.

# A pending reply's body: ``{"state": "planning" | "tuning", "waited_s": float}``.

# Nesting deeper than this is refused before any handler sees the body.
MAX_DEPTH = 64


class ErrorCode(enum.IntEnum):
    BAD_FRAME = 1
    VERSION_MISMATCH = 2
    UNKNOWN_METHOD = 3
    BAD_REQUEST = 4
    TOO_LARGE = 5
    INTERNAL = 6
    SHUTTING_DOWN = 7
    NOT_HANDSHAKEN = 8
    BUSY = 9
    UNKNOWN_GRAPH = 10
    DEADLINE_EXCEEDED = 11


class ProtocolError(Exception):
    """A frame that cannot be understood; carries the error code to answer it with."""

    code = ErrorCode.BAD_FRAME

    def __init__(self, message: str, request_id: int | None = None):
        super().__init__(message)
        self.request_id = request_id


class BadFrame(ProtocolError):
    """Not msgpack, not a four-element array, or fields of the wrong type."""

    code = ErrorCode.BAD_FRAME


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version."""

    code = ErrorCode.VERSION_MISMATCH


class TooLarge(ProtocolError):
    """The frame is larger than the configured maximum message size."""

    code = ErrorCode.TOO_LARGE


class UnknownMethod(ProtocolError):
    """The method name is not one the daemon serves."""

    code = ErrorCode.UNKNOWN_METHOD


class Busy(ProtocolError):
    """The request cannot be served while work is in flight; retry later."""

    code = ErrorCode.BUSY


class BadRequest(ProtocolError):
    """The body of a known method is missing fields or has values of the wrong type."""

    code = ErrorCode.BAD_REQUEST


class UnknownGraph(ProtocolError):
    """The keys name a graph or plan the daemon does not hold; send make_plan first."""

    code = ErrorCode.UNKNOWN_GRAPH


class DeadlineExceeded(ProtocolError):
    """Planning ran past the daemon's deadline (``HYPATIA_PLAN_DEADLINE_S``) and was abandoned."""

    code = ErrorCode.DEADLINE_EXCEEDED


class RemoteError(Exception):
    """The daemon answered a request with an error reply."""

    def __init__(self, code: int, message: str):
        try:
            self.code: ErrorCode | int = ErrorCode(code)
        except ValueError:
            self.code = code
        name = self.code.name if isinstance(self.code, ErrorCode) else str(code)
        super().__init__(f"hypatiad answered {name}: {message}")
        self.remote_message = message


@dataclass(frozen=True)
class Request:
    request_id: int
    method: str
    body: dict


@dataclass(frozen=True)
class Reply:
    request_id: int | None
    ok: bool
    body: Any
    pending: bool = False  # an interim reply: the work goes on, the final reply follows

    def result(self) -> Any:
        """The body of an ok reply; raises :class:`RemoteError` for an error reply."""
        if self.ok:
            return self.body
        body = self.body if isinstance(self.body, dict) else {}
        raise RemoteError(int(body.get("code", ErrorCode.INTERNAL)), str(body.get("message", "")))


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, max_bytes: int) -> Any:
    if len(data) > max_bytes:
        raise TooLarge(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise BadFrame(f"not a msgpack frame ({type(exc).__name__}: {exc})") from None
    _check_depth(obj)
    return obj


def _check_depth(obj: Any) -> None:
    stack = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BadFrame(f"message nests deeper than {MAX_DEPTH} levels")
        if isinstance(item, list):
            stack.extend((x, depth + 1) for x in item if isinstance(x, (list, dict)))
        elif isinstance(item, dict):
            stack.extend((x, depth + 1) for x in item.values() if isinstance(x, (list, dict)))


def encode_request(request_id: int, method: str, body: dict | None = None) -> bytes:
    return pack([PROTOCOL_VERSION, request_id, method, body or {}])


def decode_request(data: bytes, max_bytes: int) -> Request:
    """Parse a request frame; raises a :class:`ProtocolError` subclass saying what is wrong."""
    obj = unpack(data, max_bytes)
    if not isinstance(obj, list) or len(obj) != 4:
        raise BadFrame("a request is a msgpack array [version, id, method, body]")
    version, request_id, method, body = obj
    rid = request_id if isinstance(request_id, int) and not isinstance(request_id, bool) else None
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"client speaks protocol {version!r}, this daemon speaks {PROTOCOL_VERSION}; "
            "upgrade the older of the two (pip install -U hypatia) and restart the daemon",
            rid,
        )
    if rid is None:
        raise BadFrame("request id must be an integer")
    if not isinstance(method, str):
        raise BadFrame("method must be a string", rid)
    if method not in METHODS:
        raise UnknownMethod(f"unknown method {method[:64]!r}; known: {', '.join(METHODS)}", rid)
    if not isinstance(body, dict):
        raise BadFrame("body must be a map", rid)
    return Request(rid, method, body)


def encode_reply(request_id: int | None, body: Any) -> bytes:
    return pack([PROTOCOL_VERSION, request_id, "ok", body])


def encode_error(request_id: int | None, code: ErrorCode, message: str) -> bytes:
    return pack([PROTOCOL_VERSION, request_id, "error", {"code": int(code), "message": message}])


def encode_pending(request_id: int, body: dict) -> bytes:
    return pack([PROTOCOL_VERSION, request_id, "pending", body])


def decode_reply(data: bytes, max_bytes: int) -> Reply:
    obj = unpack(data, max_bytes)
    if not isinstance(obj, list) or len(obj) != 4 or obj[2] not in ("ok", "error", "pending"):
        raise BadFrame("a reply is a msgpack array [version, id, status, body]")
    version, request_id, status, body = obj
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise VersionMismatch(f"daemon speaks protocol {version!r}, this client {PROTOCOL_VERSION}")
    return Reply(request_id, status == "ok", body, pending=status == "pending")


def require(body: dict, field: str, kind: type | tuple[type, ...], request_id: int | None = None) -> Any:
    """``body[field]`` if present with the right type, else :class:`BadRequest`."""
    if field not in body:
        raise BadRequest(f"missing field {field!r}", request_id)
    value = body[field]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise BadRequest(f"field {field!r} has type {type(value).__name__}", request_id)
    return value
