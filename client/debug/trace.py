"""Events of torch's structured trace (what ``TORCH_TRACE`` writes) that the artifacts folder
keeps: Inductor's output code, Dynamo's guards and its graph breaks, each with the compile id
(``frame/attempt``) of the frame compile that logged it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from hypatia.client.torch_internals import structured_trace_logger

# structured-trace event (or artifact) name -> what the folder calls it
KEPT = {
    "inductor_output_code": "inductor_output_code",
    "dynamo_cpp_guards_str": "guards",
    "dynamo_guards": "guard_list",
    "dynamo_graph_break_reason": "graph_break",
}
_CONTEXT = ("rank", "compiled_autograd_id", "frame_id", "frame_compile_id", "attempt", "stack", "has_payload",
            "subgraph_name")


@dataclass(frozen=True)
class Event:
    kind: str  # a value of KEPT
    compile_id: str | None
    metadata: dict
    payload: str


def event_of(record: logging.LogRecord) -> Event | None:
    """The kept event a trace record holds, or None."""
    metadata = getattr(record, "metadata", None)
    if not isinstance(metadata, dict):
        return None
    names = [k for k in metadata if k not in _CONTEXT]
    if not names:
        return None
    name, body = names[0], metadata[names[0]]
    if name == "artifact" and isinstance(body, dict):
        name = body.get("name", "")
    if name not in KEPT:
        return None
    frame = metadata.get("frame_id")
    compile_id = None if frame is None else f"{frame}/{metadata.get('frame_compile_id')}"
    payload = getattr(record, "payload", None)
    return Event(KEPT[name], compile_id, body if isinstance(body, dict) else {}, payload if isinstance(payload, str) else "")


class TraceCollector(logging.Handler):
    """Hands every kept event to ``sink``; installed on torch's trace logger while artifacts are
    on (torch builds its events only while that logger has a handler)."""

    def __init__(self, sink: Callable[[Event], None]):
        super().__init__(logging.DEBUG)
        self.sink = sink
        self._logger: logging.Logger | None = None
        self._level = logging.NOTSET

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = event_of(record)
            if event is not None:
                self.sink(event)
        except Exception:  # noqa: BLE001 - a debug aid never breaks a compile
            self.handleError(record)

    def install(self) -> "TraceCollector":
        logger = structured_trace_logger()
        self._logger, self._level = logger, logger.level
        if logger.getEffectiveLevel() > logging.DEBUG:
            logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self

    def remove(self) -> None:
        if self._logger is not None:
            self._logger.removeHandler(self)
            if not self._logger.handlers:
                self._logger.setLevel(self._level)
            self._logger = None
