"""The artifacts folder of one process: numbers its graphs, writes each graph's folder, and files
the structured-trace events torch logs around them (Inductor's output code, guards, graph
breaks) where they belong.

Events carry the compile id of the frame compile that logged them; a graph's folder gets those
of its own compile: Inductor's code (logged while the graph compiles, before its folder
exists, so held until then), its guards (logged after the backend returns) and the graph breaks
its frame met. Every event is also kept at the process level: ``guards-<frame>-<attempt>.txt``
and ``graph_breaks.json``.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import deque
from pathlib import Path
from typing import Callable

from hypatia.debug.artifacts import GraphArtifacts, write_graph, write_inductor
from hypatia.debug.folder import process_folder, write_json, write_text
from hypatia.debug.trace import Event, TraceCollector
from hypatia.debug.trail import Trail

PENDING = 256  # events held for a graph folder not made yet
BREAKS = 4096  # graph breaks kept for the process file (a frame that breaks on every call would grow it)


def graph_break(event: Event) -> dict:
    """``{"reason", "where", "compile_id", "detail"}`` from Dynamo's graph-break event: the
    reason Dynamo gives (with its explanation and hints), the user's line it broke at, and the
    whole message with the user's stack."""
    text = event.payload.strip()
    where = re.search(r"Graph break in user code at (.+)", text)
    reason = re.search(r"Graph Break Reason: (.*?)(?:\n\s*User code traceback:|\Z)", text, re.S)
    return {"reason": (reason.group(1).strip() if reason else text.splitlines()[0] if text else ""),
            "where": where.group(1).strip() if where else "", "compile_id": event.compile_id, "detail": text}


class Recorder:
    """Writes ``root``'s folder for this process; ``on_error(what, exc)`` hears of every file it
    could not write (it never raises into a compile)."""

    def __init__(self, root: str | Path, on_error: Callable[[str, BaseException], None] | None = None):
        self.root = Path(root)
        self.on_error = on_error or (lambda what, exc: None)
        self.graphs = 0
        self.by_compile: dict[str, list[GraphArtifacts]] = {}
        self.pending: deque[Event] = deque(maxlen=PENDING)
        self.breaks: deque[dict] = deque(maxlen=BREAKS)  # the latest graph breaks of the process
        self.guard_files = 0
        self.closed: set[str] = set()  # compile ids whose guards came: their compile is over
        self._lock = threading.RLock()
        self.collector = TraceCollector(self._event).install()

    @property
    def folder(self) -> Path:
        return process_folder(self.root)

    def record(self, trail: Trail) -> GraphArtifacts | None:
        """Write the folder of the graph ``trail`` describes (the next number); None when even
        the folder could not be made."""
        with self._lock:
            self.graphs += 1
            try:
                g, errors = write_graph(self.folder, self.graphs, trail)
            except Exception as exc:  # noqa: BLE001 - a debug aid never breaks a compile
                self.on_error("graph folder", exc)
                return None
            for what, exc in errors:
                self.on_error(what, exc)
            self._guarded("graph_breaks.json", lambda: write_json(
                g.path / "graph_breaks.json", [b for b in self.breaks if b["compile_id"] == trail.compile_id]))
            if trail.compile_id is not None:
                if trail.compile_id in self.closed:  # the id again, after torch._dynamo.reset()
                    self.closed.discard(trail.compile_id)
                    self.by_compile.pop(trail.compile_id, None)
                self.by_compile.setdefault(trail.compile_id, []).append(g)
                held = [e for e in self.pending if e.compile_id == trail.compile_id and e.kind == "inductor_output_code"]
                for event in held:
                    self.pending.remove(event)
                    self._deliver(g, event)
            return g

    def note_fallback(self, g: GraphArtifacts, reason: str) -> None:
        """Add ``reason`` to the fallbacks of ``g``'s summary (a graph that failed at run time and
        runs as eager PyTorch from then on)."""
        with self._lock:
            path = g.path / "summary.json"
            summary = json.loads(path.read_text())
            summary["fallbacks"].append({"reason": reason})
            summary["executor"] = "eager"
            write_json(path, summary)

    def _guarded(self, what: str, write: Callable[[], object]) -> None:
        try:
            write()
        except Exception as exc:  # noqa: BLE001 - one file lost, not the run
            self.on_error(what, exc)

    def _event(self, event: Event) -> None:
        with self._lock:
            self._guarded(event.kind, lambda: self._file(event))

    def _file(self, event: Event) -> None:
        if event.kind == "graph_break":
            self.breaks.append(graph_break(event))
            write_json(self.folder / "graph_breaks.json", list(self.breaks))
            return
        if event.kind == "inductor_output_code" and event.compile_id in self.closed:
            self.closed.discard(event.compile_id)  # a new compile under an old id (after a reset)
            self.by_compile.pop(event.compile_id, None)
        if event.kind == "guards":
            self.guard_files += 1
            name = f"guards-{self.guard_files:03d}-{(event.compile_id or 'unknown').replace('/', '-')}.txt"
            write_text(self.folder / name, event.payload)
        if event.kind in ("guards", "guard_list") and event.compile_id is not None:
            self.closed.add(event.compile_id)
        graphs = self.by_compile.get(event.compile_id or "", [])
        if event.kind == "inductor_output_code" and event.compile_id is None:
            # a candidate executor built on a later call, outside any frame compile
            write_inductor(GraphArtifacts(self.folder, 0, ""), [(event.metadata, event.payload)])
        elif graphs and event.kind == "inductor_output_code":
            self._deliver(graphs[-1], event)
        elif graphs:
            for g in graphs:
                self._deliver(g, event)
        elif event.kind == "inductor_output_code":
            self.pending.append(event)

    def _deliver(self, g: GraphArtifacts, event: Event) -> None:
        if event.kind == "inductor_output_code":
            write_inductor(g, [(event.metadata, event.payload)])
        elif event.kind == "guards":
            write_text(g.path / "guards.txt", event.payload + ("" if event.payload.endswith("\n") else "\n"))
        elif event.kind == "guard_list":
            write_text(g.path / "guards.json", event.payload + "\n")

    def close(self) -> None:
        """Stop listening to torch's trace; the next :func:`recorder_for` makes a new recorder."""
        self.collector.remove()
        with _lock:
            for key in [k for k, v in _recorders.items() if v is self]:
                del _recorders[key]


_recorders: dict[tuple[int, str], Recorder] = {}
_lock = threading.Lock()


def recorder_for(root: str | Path, on_error: Callable[[str, BaseException], None] | None = None) -> Recorder:
    """This process's recorder for ``root`` (made, and listening to torch's trace, on the first
    call; a forked child makes its own); ``on_error`` replaces the one given before."""
    key = (os.getpid(), str(Path(root).expanduser().absolute()))
    with _lock:
        found = _recorders.get(key)
        if found is None:
            for old in [k for k in _recorders if k[0] != key[0]]:  # the parent's, inherited through fork
                _recorders.pop(old).collector.remove()
            found = _recorders[key] = Recorder(key[1], on_error)
        elif on_error is not None:
            found.on_error = on_error
        return found
