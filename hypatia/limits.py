"""How much of a request hypatiad may keep: one named limit per field it holds in memory, writes
to the store or to its log, and the checks that apply them.

A message as a whole is bounded by ``HYPATIA_MAX_MESSAGE_BYTES`` (64 MiB by default), which is
far more than any single field needs: a client's 50 MiB ``host`` fits in one message, and kept
per client it would grow the daemon by 100 MiB a hello. So every field the daemon keeps is
bounded here as well. A field over its limit is refused with :class:`BadRequest` naming the
field and the limit; only free text that nothing is keyed by (a fallback's reason, a
verdict's detail, an executor's error) is cut to its limit instead, since the rest of its
report is worth keeping. Graph size has its own limit, checked where graphs are parsed.
"""

from __future__ import annotations

from typing import Any

from hypatia.protocol import BadRequest, pack

# hello: who a client is. Clients are keyed by host and pid, so these are never truncated.
MAX_HOST_CHARS = 255  # a fully qualified domain name has at most 253
MAX_VERSION_CHARS = 64
MAX_PROGRAM_CHARS = 1024  # the client sends its command line cut to 200
MAX_PID = 2**31 - 1

# keys: g1-, w1-, e1- and r1- followed by 64 hex digits
MAX_KEY_CHARS = 128

# report
MAX_REASON_CHARS = 500  # a fallback's reason, logged (cut)
MAX_FALLBACKS = 1_000_000  # per report
MAX_VERDICTS = 10_000  # per report
MAX_NAME_CHARS = 200  # a rule, kernel or implementation id a verdict names (stored)
MAX_DETAIL_CHARS = 500  # a verdict's detail, an executor candidate's error (stored, cut)
MAX_MODEL_LABEL_CHARS = 100  # a make_plan's optional label of the compiled module (kept with its graph, cut)
MAX_EXECUTOR_TIMES = 16  # measured candidates per executor report
MAX_REGION = 2**31 - 1  # a region is named by its output's node index

# make_plan: stored with the plan (the graph is bounded where graphs are parsed)
MAX_WORKLOAD_BYTES = 4 << 20  # msgpack size of the input metas
MAX_ENVIRONMENT_BYTES = 64 << 10  # msgpack size of the environment description


def text(body: dict, field: str, limit: int, request_id: int | None, *, required: bool = False,
         cut: bool = False, default: str | None = None) -> str | None:
    """``body[field]`` as a string of at most ``limit`` characters; ``default`` when absent and
    not ``required``. A longer one is refused, or with ``cut`` (free text) cut to ``limit``."""
    if field not in body:
        if required:
            raise BadRequest(f"missing field {field!r}", request_id)
        return default
    value = body[field]
    if not isinstance(value, str):
        raise BadRequest(f"field {field!r} must be a string, not {type(value).__name__}", request_id)
    if len(value) > limit:
        if cut:
            return value[:limit]
        raise BadRequest(f"field {field!r} has {len(value)} characters; the limit is {limit}", request_id)
    return value


def integer(body: dict, field: str, low: int, high: int, request_id: int | None, *, required: bool = False,
            default: int | None = None) -> int | None:
    """``body[field]`` as an integer in ``[low, high]``; ``default`` when absent and not ``required``."""
    if field not in body:
        if required:
            raise BadRequest(f"missing field {field!r}", request_id)
        return default
    value = body[field]
    if type(value) is not int or not low <= value <= high:
        raise BadRequest(f"field {field!r} must be an integer in [{low}, {high}], not {_shown(value)}", request_id)
    return value


def number(body: dict, field: str, request_id: int | None, default: float = 0.0) -> float:
    """``body[field]`` as a float (an int or a float on the wire; None for ``default``)."""
    value = body.get(field)
    if value is None:
        return default
    if type(value) not in (int, float):
        raise BadRequest(f"field {field!r} must be a number, not {type(value).__name__}", request_id)
    return float(value)


def packed(body: dict, field: str, kind: type, limit: int, request_id: int | None) -> Any:
    """``body[field]``, of type ``kind``, whose msgpack encoding is at most ``limit`` bytes."""
    if field not in body:
        raise BadRequest(f"missing field {field!r}", request_id)
    value = body[field]
    if not isinstance(value, kind):
        raise BadRequest(f"field {field!r} must be a {kind.__name__}, not {type(value).__name__}", request_id)
    size = len(pack(value))
    if size > limit:
        raise BadRequest(f"field {field!r} takes {size} bytes; the limit is {limit}", request_id)
    return value


def _shown(value: Any) -> str:
    """A value for an error message, never longer than a line."""
    text = repr(value) if isinstance(value, (int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."
