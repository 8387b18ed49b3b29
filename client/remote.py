"""Remote mode (``HYPATIA_MODE=remote``): hypatiad runs this process's CPU inference graphs on
tensors passed through shared memory (:mod:`hypatia.shm`), and the results come back the same way.

One call: every input goes into a segment of this process, a ``run`` request names the graph's
keys and the segments, the daemon answers with output segments it made for this process, the
outputs are copied out. Before the call returns, every segment of it is unlinked here, whatever
happened. Only a reply that arrives after the call gave up can leave segments behind; the next
call, this process's exit, or (once this process is gone) the daemon's sweep removes them.

A graph the daemon cannot run (a training graph, GPU tensors, constants baked in, dynamic
shapes) runs locally, with one warning per reason and a counter; so does any call the daemon
cannot serve (down, silent, an error reply): a model never fails because of remote mode.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch

from hypatia import shm
from hypatia.canonical import CanonicalGraph, is_ref
from hypatia.client import capture as cap
from hypatia.client.rpc import DaemonClient, DaemonUnavailable
from hypatia.config import Config, read_daemon_pid
from hypatia.planner import rebuild
from hypatia.protocol import ErrorCode, RemoteError

log = logging.getLogger("hypatia.client")

# After a daemon that runs but did not answer a run, run locally this long before asking again.
UNRESPONSIVE_BACKOFF_S = 10.0


class RemoteModeWarning(RuntimeWarning):
    """A graph or a call runs in this process although ``HYPATIA_MODE=remote``."""


class RemoteFailed(Exception):
    """The daemon did not run this call; it runs locally."""


@dataclass(frozen=True)
class RemoteGraph:
    """What a run request needs to name a graph, and to register it again with a daemon that
    lost it (restarted on a flushed store)."""

    keys: tuple[str, str, str]
    registration: dict  # a make_plan body
    output_type: type
    outputs: tuple[tuple[list[int], str] | None, ...]  # (shape, dtype) of each tensor output


def _output_specs(graph: CanonicalGraph) -> tuple[tuple[list[int], str] | None, ...]:
    """(shape, dtype) of each output of a graph returning a sequence; None for a non-tensor."""
    specs = []
    for out in graph.outputs[1]:
        meta = graph.nodes[out[1]].meta if is_ref(out) else None
        tensor = isinstance(meta, list) and len(meta) == 5 and meta[0] == "T"
        specs.append((meta[1], meta[3]) if tensor else None)
    return tuple(specs)


class RemoteCall:
    """The compiled function of a remote graph (boxed calling convention): runs in the daemon,
    or ``local`` when the daemon does not serve the call."""

    def __init__(self, runner: "RemoteRunner", graph: RemoteGraph, local: Callable[[list], Any]):
        self._boxed_call = True  # instance attribute: see GuardedCall
        self.runner = runner
        self.graph = graph
        self.local = local

    def __call__(self, args: list) -> Any:
        try:
            return self.runner.run(self.graph, args)
        except RemoteFailed as exc:
            self.runner.fell_back(exc)
            return self.local(args)


class RemoteRunner:
    """Per-process remote mode: which graphs go to the daemon, the calls, the segments in flight."""

    def __init__(self, config: Config, client: DaemonClient, counters: Counter):
        self.config = config
        self.client = client
        self.counters = counters
        self._warned: set[str] = set()
        self._live: set[str] = set()  # tags of calls whose segments are in use right now
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._reclaim = False
        self._skip_until = 0.0
        atexit.register(self.reclaim)

    # -- which graphs run remotely -----------------------------------------------------------
    def wrap(self, graph: CanonicalGraph, keys: tuple[str, str, str], registration: dict, phase: str,
             example_inputs: list[Any], output_type: type, local: Callable[[list], Any]) -> Callable[[list], Any]:
        """A :class:`RemoteCall` for ``graph``, or ``local`` itself when the daemon cannot run it."""
        reason = self._ineligible(graph, phase, example_inputs, output_type)
        if reason is not None:
            self.counters["remote_local_graphs"] += 1
            self._warn(reason.split(":")[0], f"HYPATIA_MODE=remote: this graph runs in this process ({reason})")
            return local
        self.counters["remote_graphs"] += 1
        return RemoteCall(self, RemoteGraph(keys, registration, output_type, _output_specs(graph)), local)

    def _ineligible(self, graph: CanonicalGraph, phase: str, example_inputs: list[Any], output_type: type) -> str | None:
        if self.config.remote:
            return "daemon on another host: shared memory reaches only a daemon on this host (HYPATIA_CONNECT is set)"
        if phase != "inference":
            return "training graph: remote mode runs inference graphs (no autograd) only"
        if cap.graph_device(graph) != "cpu" or any(
                not isinstance(x, torch.Tensor) or x.device.type != "cpu" for x in example_inputs):
            return "not CPU tensors: remote mode passes CPU tensors only (no CUDA IPC yet)"
        if output_type not in (tuple, list) or not (isinstance(graph.outputs, list) and graph.outputs[:1] == ["l"]):
            return f"not rebuildable in the daemon: the graph returns a {output_type.__name__}, not a sequence"
        why = rebuild.unsupported(graph)
        return None if why is None else f"not rebuildable in the daemon: {why}"

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message + "; `hypatia-ctl stats` and the session counters count these.",
                          RemoteModeWarning, stacklevel=3)

    def fell_back(self, exc: BaseException) -> None:
        """A call that runs locally: counted, warned once per kind of cause."""
        self.counters["remote_fallbacks"] += 1
        cause = exc.__cause__ or exc
        log.debug("remote call runs locally: %s", exc, exc_info=cause)
        self._warn(f"call:{type(cause).__name__}", f"HYPATIA_MODE=remote: a call runs in this process ({exc})")

    # -- one call --------------------------------------------------------------------------
    def run(self, graph: RemoteGraph, args: list) -> Any:
        """The outputs of ``graph`` on ``args``, computed by the daemon; :class:`RemoteFailed`
        when it did not compute them (every segment of the call is gone by then)."""
        if self._pid != os.getpid():  # a forked child: the parent's calls and lock are not its own
            self._live, self._lock, self._pid = set(), threading.Lock(), os.getpid()
        if time.monotonic() < self._skip_until:
            raise RemoteFailed("hypatiad did not answer a recent run; running locally for a while")
        if read_daemon_pid(self.config) is None:
            raise RemoteFailed(f"no hypatiad is running for {self.config.endpoint}")
        if self._reclaim:
            self.reclaim()
        pid, tag = os.getpid(), secrets.token_hex(8)
        created: list[str] = []
        with self._lock:
            self._live.add(tag)
        try:
            daemon = self._daemon()
            inputs = []
            for k, value in enumerate(args):
                if not isinstance(value, torch.Tensor):
                    raise RemoteFailed(f"input {k} is a {type(value).__name__}, not a tensor")
                desc = shm.put(value, shm.segment_name(daemon, pid, f"{tag}i{k}"))
                if desc.name is not None:
                    created.append(desc.name)
                    self.counters["shm_segments_created"] += 1
                    self.counters["shm_bytes_sent"] += desc.nbytes
                inputs.append(desc.to_wire())
            body = {"graph_key": graph.keys[0], "workload_key": graph.keys[1], "env_key": graph.keys[2],
                    "pid": pid, "tag": tag, "inputs": inputs}
            result = self._request(graph, body)
            outputs = self._outputs(result, daemon, pid, tag, graph.outputs)
            self.counters["remote_runs"] += 1
            return graph.output_type(outputs)
        except RemoteFailed:
            raise
        except DaemonUnavailable as exc:
            self._reclaim = True  # a reply may yet come, with segments in it
            self._skip_until = time.monotonic() + UNRESPONSIVE_BACKOFF_S
            raise RemoteFailed(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - an error reply, a full /dev/shm, a malformed reply: run locally
            raise RemoteFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            for name in created:
                shm.unlink(name)
            with self._lock:
                self._live.discard(tag)

    def _daemon(self) -> str:
        """The id of the daemon this process talks to, which every segment of a call names (its
        hello reply gives it; a process that has not talked to it yet says hello first)."""
        if self.client.server is None:
            self.client.call("ping")
        daemon = (self.client.server or {}).get("daemon")
        if not isinstance(daemon, str) or not shm.DAEMON_RE.fullmatch(daemon):
            raise RemoteFailed(f"hypatiad's hello reply names no daemon id ({str(daemon)[:40]!r})")
        return daemon

    def _request(self, graph: RemoteGraph, body: dict) -> Any:
        try:
            return self.client.call("run", body, timeout_ms=self.config.run_timeout_ms, retries=0)
        except RemoteError as exc:
            if exc.code != ErrorCode.UNKNOWN_GRAPH:
                raise
        # the daemon lost the graph (a flushed store): register it again, then ask once more
        self.counters["remote_reregistered"] += 1
        self.client.call("make_plan", graph.registration, timeout_ms=self.config.run_timeout_ms)
        return self.client.call("run", body, timeout_ms=self.config.run_timeout_ms, retries=0)

    def _outputs(self, result: Any, daemon: str, pid: int, tag: str, expected: tuple) -> list[Any]:
        """Copy the reply's outputs out, then unlink every segment it names (those of this call
        only: a reply never makes this process unlink anything else). The outputs must be the
        graph's: as many, tensors where it has tensors, of its shapes and dtypes."""
        entries = result.get("outputs") if isinstance(result, dict) else None
        if not isinstance(entries, list):
            self._reclaim = True
            raise shm.BadDescriptor("the run reply has no outputs list")
        names = []
        for entry in entries:
            name = entry.get("name") if isinstance(entry, dict) else None
            if isinstance(name, str) and name.startswith(shm.segment_name(daemon, pid, tag + "o")):
                names.append(name)
        try:
            if len(entries) != len(expected):
                raise shm.BadDescriptor(f"the reply has {len(entries)} outputs, the graph {len(expected)}")
            outputs = []
            for entry, spec in zip(entries, expected):
                if spec is None and isinstance(entry, dict) and set(entry) == {"value"}:
                    outputs.append(entry["value"])
                    continue
                desc = shm.Descriptor.parse(entry, pid, tag + "o", daemon)
                if spec is None or list(desc.shape) != spec[0] or desc.dtype != spec[1]:
                    raise shm.BadDescriptor(f"an output is {desc.dtype}{list(desc.shape)}, the graph's is {spec}")
                outputs.append(shm.read(desc))
                self.counters["shm_bytes_received"] += desc.nbytes
            return outputs
        finally:
            for name in names:
                if shm.unlink(name):
                    self.counters["shm_segments_received"] += 1

    def reclaim(self) -> int:
        """Unlink this process's segments that no call in progress uses (left by a reply that
        came too late to be read); returns how many."""
        pid = os.getpid()
        with self._lock:
            self._reclaim = False
            live = tuple(self._live)
        removed = 0
        for name in shm.names_of(pid):
            if not name.split("-", 4)[4].startswith(live):
                removed += shm.unlink(name)
        self.counters["shm_reclaimed"] += removed
        return removed
