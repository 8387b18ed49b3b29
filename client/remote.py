"""Remote mode (``HYPATIA_MODE=remote``): hypatiad runs this process's inference graphs on its
device (its GPU, or its CPU when it has none), through the hypatia device's machinery
(:mod:`hypatia.device`): a thin layer on it, not a path of its own.

Each call of a graph is one recorded step (a :class:`~hypatia.device.compiled.GraphCall`) on a
recorder of remote mode's own, flushed at once: the daemon plans the structure once, keeps its
executable and runs it under the executor it measured fastest, as it does every device graph.
The graph's parameters and buffers (the inputs Dynamo marks static) go up once, by content
digest, so processes with the same weights share one copy, and stay there while the tensor
lives unwritten; the batch rides on the execute; the outputs come back. To a daemon on this
host tensors travel through private shared memory, to one on another host (``HYPATIA_CONNECT``)
inside the messages.

A graph the daemon should not run (a training graph, GPU tensors, an op that draws random
numbers from the client's generator or writes to its arguments) runs locally, with one warning
per reason and a counter; so does any call the daemon does not serve (down, silent, an error
reply): a model never fails because of remote mode. A graph the daemon refused runs locally
from then on. A daemon that was lost (stopped, restarted, silent) is asked again later in a
fresh session: the tensors it held were its own, and the weights go up again (by digest, so
for nothing where another process kept them).
"""

from __future__ import annotations

import logging
import operator
import os
import threading
import time
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
from torch.fx.node import map_aggregate

from hypatia.client.torch_internals import static_input_indices
from hypatia.config import Config, read_daemon_pid
from hypatia.planner import rebuild

log = logging.getLogger("hypatia.client")

# After a daemon that runs but did not answer, run locally this long before asking again.
UNRESPONSIVE_BACKOFF_S = 10.0
_META = torch.device("meta")
_CONSTANT_OUTPUT = (type(None), bool, int, float)


class RemoteModeWarning(RuntimeWarning):
    """A graph or a call runs in this process although ``HYPATIA_MODE=remote``."""


class RemoteFailed(Exception):
    """The daemon did not run this call; it runs locally. ``kind``: the cause it is warned as."""

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.kind = kind


@dataclass
class RemoteGraph:
    """A graph as remote mode calls it: one recorded step, and how its outputs come back."""

    call: Any  # a GraphCall of the graph, its CPU devices made ``meta`` (the daemon's device)
    metas: list[torch.Tensor | None]  # each output's metadata; None for a constant output
    constants: list[Any]  # each output's value where it is a constant (None, a number), else None
    lifted: list[torch.Tensor]  # the graph's constant tensors, made inputs after its own
    static: frozenset[int]  # the inputs that go up once (parameters, buffers)
    output_type: type
    refused: str | None = field(default=None)  # why the daemon refused it: it runs locally from then on


def remote_graph(aten: torch.fx.GraphModule, dynamo: torch.fx.GraphModule, output_type: type) -> RemoteGraph:
    """The remote graph of ``aten`` (the functional ATen graph of Dynamo's ``dynamo``); raises
    :class:`NotRemote` saying why the daemon should not run it."""
    from hypatia.client.graphs import copy_of
    from hypatia.device.compiled import GraphCall, NotTraceable, constants_as_inputs

    gm = copy_of(aten, aten)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is not operator.getitem:
            try:
                rebuild.check_op(node.target)  # what the daemon would refuse, or run on its own generator
            except rebuild.NotRebuildable as exc:
                raise NotRemote(str(exc)) from None
        node.args = map_aggregate(node.args, _as_meta)
        node.kwargs = map_aggregate(node.kwargs, _as_meta)
    try:
        lifted = constants_as_inputs(gm)
    except NotTraceable as exc:
        raise NotRemote(str(exc)) from None
    outputs = gm.graph.output_node().args[0]
    if not isinstance(outputs, (tuple, list)) or output_type not in (tuple, list):
        raise NotRemote(f"the graph returns a {output_type.__name__}, not a sequence")
    metas, constants = [], []
    for k, out in enumerate(outputs):
        if isinstance(out, torch.fx.Node):
            val = out.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise NotRemote(f"output {k} is a {type(val).__name__}, not a tensor")
            metas.append(torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=_META))
            constants.append(None)
        elif isinstance(out, _CONSTANT_OUTPUT):
            metas.append(None)
            constants.append(out)
        else:
            raise NotRemote(f"output {k} is a {type(out).__name__}")
    return RemoteGraph(GraphCall(gm), metas, constants, lifted, frozenset(static_input_indices(dynamo)), output_type)


class NotRemote(Exception):
    """A graph the daemon should not run for this process (the message says why)."""


def _as_meta(x: Any) -> Any:
    """The CPU as a device argument becomes ``meta``, which stands for the daemon's device."""
    return _META if isinstance(x, torch.device) and x.type == "cpu" else x


class RemoteCall:
    """The compiled function of a remote graph (boxed calling convention): runs in the daemon,
    or ``local`` when the daemon does not serve the call."""

    def __init__(self, runner: "RemoteRunner", graph: RemoteGraph, local: Callable[[list], Any]):
        self._boxed_call = True  # instance attribute: see GuardedCall
        self.runner = runner
        self.graph = graph
        self.local = local

    def __call__(self, args: list) -> Any:
        if self.graph.refused is None:
            try:
                return self.runner.run(self.graph, args)
            except RemoteFailed as exc:
                self.runner.fell_back(exc)
        else:
            self.runner.counters["remote_refused_calls"] += 1
        return self.local(args)


class _Session:
    """One device session of remote mode: its recorder, and the values of the static inputs it
    holds, by tensor (while it lives) and version (while nothing writes it)."""

    def __init__(self, config: Config):
        from hypatia.device.link import Link
        from hypatia.device.trace import Recorder

        self.recorder = Recorder(Link(config), config.device_max_ops)
        self.statics: dict[int, tuple[weakref.ref, int, Any]] = {}

    @property
    def link(self) -> Any:
        return self.recorder.link

    def value(self, t: torch.Tensor, static: bool) -> Any:
        from hypatia.device.values import upload_value

        if not static:
            return upload_value(t)
        key = id(t)
        found = self.statics.get(key)
        if found is not None and found[0]() is t and found[1] == t._version:
            return found[2]
        v = upload_value(t)
        v.ask = True  # asked for by digest first: another process may hold the same weights
        statics = self.statics
        statics[key] = (weakref.ref(t, lambda _, key=key: statics.pop(key, None)), t._version, v)
        return v


class RemoteRunner:
    """Per-process remote mode: which graphs go to the daemon, its session, the calls."""

    def __init__(self, config: Config, counters: Counter):
        self.config = config
        self.counters = counters
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._session: _Session | None = None
        self._skip_until = 0.0

    # -- which graphs run remotely -----------------------------------------------------------
    def wrap(self, aten: torch.fx.GraphModule, dynamo: torch.fx.GraphModule, phase: str, example_inputs: list[Any],
             output_type: type, local: Callable[[list], Any]) -> Callable[[list], Any]:
        """A :class:`RemoteCall` for the graph, or ``local`` itself when the daemon should not run it."""
        reason = self._ineligible(phase, example_inputs)
        graph = None
        if reason is None:
            try:
                graph = remote_graph(aten, dynamo, output_type)
            except NotRemote as exc:
                reason = f"not run in the daemon: {exc}"
        if graph is None:
            self.counters["remote_local_graphs"] += 1
            self._warn(reason.split(":")[0], f"HYPATIA_MODE=remote: this graph runs in this process ({reason})")
            return local
        self.counters["remote_graphs"] += 1
        return RemoteCall(self, graph, local)

    @staticmethod
    def _ineligible(phase: str, example_inputs: list[Any]) -> str | None:
        if phase != "inference":
            return "training graph: remote mode runs inference graphs (no autograd) only"
        if any(not isinstance(x, torch.Tensor) or x.device.type != "cpu" for x in example_inputs):
            return ("not CPU tensors: remote mode runs graphs of CPU tensors (a model on the daemon's GPU is a "
                    "model on the hypatia device: model.to('hypatia'))")
        return None

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
        kind = getattr(exc, "kind", None) or type(cause).__name__
        self._warn(f"call:{kind}", f"HYPATIA_MODE=remote: a call runs in this process ({exc})")

    # -- one call --------------------------------------------------------------------------
    def run(self, graph: RemoteGraph, args: list) -> Any:
        """The outputs of ``graph`` on ``args``, computed by the daemon; :class:`RemoteFailed`
        when it did not compute them."""
        from hypatia.device.link import DeviceError, DeviceFull, DeviceLost

        if self._pid != os.getpid():  # a forked child: the parent's session and lock are not its own
            self._session, self._lock, self._pid = None, threading.Lock(), os.getpid()
        if time.monotonic() < self._skip_until:
            # the silent daemon was warned about once already
            raise RemoteFailed("hypatiad did not answer a recent call; running locally for a while", "DeviceLost")
        if not self.config.remote and read_daemon_pid(self.config) is None:
            raise RemoteFailed(f"no hypatiad is running for {self.config.endpoint}")
        with self._lock:
            session = self._connected()
            try:
                try:
                    outputs = self._call(session, graph, args)
                except DeviceLost as exc:
                    if exc.unresponsive or session.link.lost is None:
                        raise
                    self._drop(session, exc)  # it restarted: nothing was served, so at once in a fresh session
                    session = self._connected()
                    outputs = self._call(session, graph, args)
            except DeviceLost as exc:  # its tensors are gone: a fresh session next time
                self._drop(session, exc)
                raise RemoteFailed(str(exc)) from exc
            except DeviceFull as exc:  # memory may be free by the next call
                raise RemoteFailed(str(exc)) from exc
            except DeviceError as exc:  # refused: this graph runs here from now on
                graph.refused = str(exc)
                self.counters["remote_refused_graphs"] += 1
                raise RemoteFailed(str(exc)) from exc
            except RemoteFailed:
                raise
            except Exception as exc:  # noqa: BLE001 - anything else: this call runs locally
                raise RemoteFailed(f"{type(exc).__name__}: {exc}") from exc
        self.counters["remote_runs"] += 1
        return graph.output_type(outputs)

    def _connected(self) -> _Session:
        if self._session is None:
            self._session = _Session(self.config)
            self.counters["remote_sessions"] += 1
        return self._session

    def _drop(self, session: _Session, exc: Exception) -> None:
        """Forget a lost session (the daemon's end of it is released or swept); after a silent
        daemon, wait :data:`UNRESPONSIVE_BACKOFF_S` before the next."""
        if getattr(exc, "unresponsive", False):
            self._skip_until = time.monotonic() + UNRESPONSIVE_BACKOFF_S
        session.link.abandon()
        self._session = None

    def _call(self, session: _Session, graph: RemoteGraph, args: list) -> list[Any]:
        rec, link = session.recorder, session.link
        before = (link.bytes_up, link.bytes_down, link.counters["plans_resent"])  # CPU tensors: never by CUDA IPC
        values = []
        for k, a in enumerate(args):
            if not isinstance(a, torch.Tensor) or a.device.type != "cpu":
                raise RemoteFailed(f"input {k} is {_what(a)}, not a CPU tensor")
            values.append(session.value(a, k in graph.static or isinstance(a, torch.nn.Parameter)))
        values += [session.value(c, True) for c in graph.lifted]
        outs = rec.record_inferred(graph.call, values, {}, graph.metas)
        try:
            tensors = iter(rec.fetch([v for v in outs if v is not None]))
        finally:  # what moved, whether or not the call came back
            self.counters["remote_bytes_up"] += link.bytes_up - before[0]
            self.counters["remote_bytes_down"] += link.bytes_down - before[1]
            self.counters["remote_reregistered"] += link.counters["plans_resent"] - before[2]
        results = []
        for k, (meta, constant) in enumerate(zip(graph.metas, graph.constants)):
            if meta is None:
                results.append(constant)
                continue
            t = next(tensors)
            if t.shape != meta.shape or t.dtype != meta.dtype:
                raise RemoteFailed(f"hypatiad sent output {k} as {t.dtype}{list(t.shape)}, the graph's is "
                                   f"{meta.dtype}{list(meta.shape)}")
            results.append(t)
        return results


def _what(x: Any) -> str:
    return f"a {x.device} tensor" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"
