"""The recorder: ops on ``hypatia`` tensors become a graph on the client, and a flush sends it.

Recording an op costs one run of its meta kernel (shapes, strides and dtypes come from torch,
never by hand). A flush happens when the client needs a value (``.cpu()``, ``.item()``, a bool
of a tensor, an op it computes itself), when ``HYPATIA_DEVICE_MAX_OPS`` ops are waiting, and at
``torch.hypatia.synchronize()``. It sends:

1. the CPU tensors waiting to go up (``model.to("hypatia")``'s parameters, a batch), each with
   its content digest, so that a weight the daemon already holds for any process is named, not
   sent;
2. one FX graph of every recorded op that a live tensor still needs, whose outputs are the
   values of the live tensors, canonicalized and keyed like any graph Hypatia compiles: the
   daemon plans a structure once (``make_plan``, the first time it sees it) and runs its cached
   executable for every later flush of that structure, the next training step's included.

Recorded ops nothing alive needs are dropped at the flush, never computed.
"""

from __future__ import annotations

import logging
import operator
import os
import types
import warnings
import weakref
from collections import Counter
from typing import Any, Callable

import torch
import torch.fx

from hypatia.client import torch_internals
from hypatia.device.values import Storage, Value, device_as, leaves, map_leaves

log = logging.getLogger("hypatia.client")


class DeviceWarning(RuntimeWarning):
    """An op on the hypatia device ran on the client (fetched, computed here, sent back)."""


_META = torch.device("meta")


def _meta_device(x: Any) -> Any:
    return x.meta if isinstance(x, Value) else device_as(x, _META)


META_CACHE_SIZE = 1 << 16


def _key(x: Any) -> Any:
    """A hashable key of an op's arguments: their structure, and each leaf's value or metadata."""
    t = type(x)
    if t is Value:
        k = x.key
        if k is None:
            m = x.meta
            k = x.key = (m.shape, m.stride(), m.dtype) if isinstance(m, torch.Tensor) else ("V", id(x))
        return k
    if t is list or t is tuple:
        return (t, tuple([_key(y) for y in x]))
    if t is dict:
        return (dict, tuple((k, _key(v)) for k, v in x.items()))
    if isinstance(x, torch.device):
        return ("D", str(x))
    if isinstance(x, float):
        return ("F", x)  # 1.0 and 1 are equal keys but make different dtypes
    return (type(x), x)


def _cacheable(out: Any) -> bool:
    """A meta kernel's output worth remembering: a tensor, or a list/tuple of tensors. Meta
    tensors are never written (writes are checked on fresh copies), so one serves every value
    recorded with the same metadata."""
    return isinstance(out, torch.Tensor) or isinstance(out, (list, tuple)) and all(
        t is None or isinstance(t, torch.Tensor) for t in out)


class Recorder:
    """One per process (see :func:`recorder`): the ops recorded since the last flush, the
    storages they changed, and the link to the daemon."""

    needs_data = (NotImplementedError, RuntimeError, *torch_internals.dynamic_output_shape_errors())

    def __init__(self, link: Any, max_ops: int):
        self.link = link
        self.max_ops = max_ops
        self._counters: Counter = Counter()
        self.intercepted = self.recorded_total = self.meta_hits = 0  # per op: plain ints, cheaper than a Counter
        self.epoch = 0  # bumped at each flush: view values derived before it are not reused
        self._dirty: list[weakref.ref] = []  # storages written since the last flush (repeats allowed)
        self._recorded = 0
        self._warned: set[str] = set()
        self._flushing = False
        self._metas: dict[tuple, Any] = {}

    @property
    def counters(self) -> Counter:
        """What this process recorded, flushed, moved and ran on the client."""
        return self._counters + self.link.counters + Counter({
            "ops_intercepted": self.intercepted, "ops_recorded": self.recorded_total, "meta_cache_hits": self.meta_hits})

    def count(self, name: str, n: int = 1) -> None:
        self._counters[name] += n

    # -- recording ---------------------------------------------------------------------------
    def dirty(self, storage: Storage) -> None:
        """``storage`` holds a value the daemon does not have yet."""
        self._dirty.append(weakref.ref(storage))

    def infer(self, func: Callable, vargs: Any, vkwargs: Any) -> Any:
        """``func``'s output metadata: its meta kernel's, remembered per op and argument
        metadata (meta kernels cost far more than the lookup; a miss is counted)."""
        try:
            key = (id(func), _key(vargs), _key(vkwargs) if vkwargs else None)
            hash(key)
        except TypeError:  # an argument that cannot be a key: infer every time
            key = None
        found = self._metas.get(key) if key is not None else None
        if found is not None:
            self.meta_hits += 1
            return found
        margs, mkwargs = map_leaves(_meta_device, (vargs, vkwargs))
        out = func(*margs, **mkwargs)
        self._counters["meta_cache_misses"] += 1
        if key is not None and _cacheable(out):
            if len(self._metas) >= META_CACHE_SIZE:
                self._metas.clear()
            self._metas[key] = out
        return out

    def infer_view(self, func: Callable, src: torch.Tensor, rest: tuple, kwargs: dict) -> Any:
        """The metadata of view ``func`` of ``src`` (remembered like :meth:`infer`'s)."""
        try:
            key = ("view", id(func), src.shape, src.stride(), src.dtype, _key(rest), _key(kwargs) if kwargs else None)
            found = self._metas.get(key)
        except TypeError:
            key = found = None
        if found is not None:
            self.meta_hits += 1
            return found
        from hypatia.device.values import meta_like

        out = func(meta_like(src), *rest, **kwargs)
        if key is not None and _cacheable(out):
            self._metas[key] = out
        return out

    def record_inferred(self, func: Callable, vargs: tuple, vkwargs: dict, out_meta: Any) -> Any:
        """Values for ``func``'s outputs (a structure like ``out_meta``), recorded."""
        self._recorded += 1
        self.recorded_total += 1
        if isinstance(out_meta, torch.Tensor):
            out: Any = Value(out_meta, func, tuple(vargs), dict(vkwargs))
        else:
            parent = Value(list(out_meta), func, tuple(vargs), dict(vkwargs))
            out = type(out_meta)(None if m is None else Value(m, operator.getitem, (parent, i))
                                 for i, m in enumerate(out_meta))
        return out

    def record(self, func: Callable, *args: Any, **kwargs: Any) -> Any:
        """Record ``func`` on values (and plain arguments); its output value(s)."""
        return self.record_inferred(func, args, kwargs, self.infer(func, args, kwargs))

    def apply_view(self, step: tuple, value: Value) -> Value:
        op, rest, kwargs, index = step
        out = self.record(op, value, *rest, **kwargs)
        return out if index is None else out[index]

    def cast(self, value: Value, dtype: torch.dtype) -> Value:
        if value.meta.dtype == dtype:
            return value
        return self.record(torch.ops.aten._to_copy.default, value, dtype=dtype)

    def ran_on_client(self, func: Any, why: str | None) -> None:
        self._counters["ops_on_client"] += 1
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(): on the client by nature
            return
        name = str(func)
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"{name} ran on the client for the hypatia device (its inputs were fetched and its result "
                          f"sent back){': ' + why if why else ''}", DeviceWarning, stacklevel=4)

    def maybe_flush(self) -> None:
        """Flush once ``HYPATIA_DEVICE_MAX_OPS`` ops are waiting."""
        if self._recorded >= self.max_ops and not self._flushing:
            self._counters["flushes_at_size"] += 1
            self.flush()

    # -- flushing ----------------------------------------------------------------------------
    def fetch(self, values: list[Value], into: torch.device | None = None) -> list[torch.Tensor]:
        """Copies of ``values`` on the client, on the CPU or ``into`` (a GPU of this process): a
        flush computes what is pending and brings these back."""
        return self.flush(want=values, into=into)

    def flush(self, want: list[Value] | None = None, into: torch.device | None = None) -> list[torch.Tensor]:
        want = list(want or [])
        self._flushing = True
        try:
            return self._flush(want, into)
        finally:
            self._flushing = False
            self._recorded = 0
            self.epoch += 1

    def _flush(self, want: list[Value], into: torch.device | None) -> list[torch.Tensor]:
        # an upload not sent yet is its own copy (a CUDA one, where this process's GPU sends by IPC)
        fetched: dict[int, torch.Tensor] = {id(v): v.cpu.to(into or "cpu", copy=True) for v in want if v.cpu is not None}
        targets: dict[int, Value] = {}
        for ref in self._dirty:
            storage = ref()
            if storage is not None and storage.value.handle is None:
                targets[id(storage.value)] = storage.value
        dirty, self._dirty = self._dirty, []
        try:
            return self._send(want, targets, fetched, into)
        except BaseException:  # nothing was lost: the next flush sends it again
            self._dirty = dirty + self._dirty
            raise

    def _send(self, want: list[Value], targets: dict[int, Value], fetched: dict[int, torch.Tensor],
              into: torch.device | None = None) -> list[torch.Tensor]:
        link = self.link
        for v in want:
            if v.handle is None and v.cpu is None:
                targets[id(v)] = v
        order, inputs = _schedule(sorted(targets.values(), key=lambda v: v.seq))
        uploads = [v for v in inputs if v.handle is None] + [v for v in targets.values() if v.cpu is not None]
        uploads = list({id(v): v for v in uploads}.values())
        outputs = sorted((v for v in targets.values() if v.pending), key=lambda v: v.seq)
        carried = []
        if uploads:  # a step's batch rides on the execute; weights ask by digest first
            carried = link.upload(uploads, defer=bool(outputs))
            self._counters["uploads"] += len(uploads)
        if outputs:
            wanted = [v for v in want if v.pending]
            device_type = link.device_type()
            values = link.execute(_structure(order, inputs, outputs),
                                  lambda: _graph_module(order, inputs, outputs, device_type),
                                  inputs, outputs, wanted, carried, into)
            fetched.update(zip(map(id, wanted), values))
            self._counters["flushes"] += 1
            self._counters["ops_flushed"] += len(order)
        for v in order:  # what no output needed is dropped: nothing may refer to it any more
            if v.pending:
                v.op, v.args, v.kwargs = None, (), {}
        rest = [v for v in want if id(v) not in fetched]
        if rest:
            fetched.update(zip(map(id, rest), link.fetch(rest, into)))
        return [fetched[id(v)] for v in want]


def _schedule(targets: list[Value]) -> tuple[list[Value], list[Value]]:
    """The pending values ``targets`` need, in an order that computes arguments first, and the
    values they read that are not pending (held or uploading): the graph's inputs."""
    order: list[Value] = []
    inputs: dict[int, Value] = {}
    seen: set[int] = set()
    stack: list[tuple[Value, bool]] = [(v, False) for v in reversed(targets)]
    while stack:
        v, expanded = stack.pop()
        if expanded:
            order.append(v)
            continue
        if id(v) in seen:
            continue
        seen.add(id(v))
        if not v.pending:
            if v.cpu is not None or v.handle is not None:
                inputs[id(v)] = v
            continue
        stack.append((v, True))
        for a in reversed(leaves((v.args, v.kwargs))):
            if isinstance(a, Value) and id(a) not in seen:
                stack.append((a, False))
    # a target that is an upload or a held value is not computed: it is not an output either
    return order, [v for v in inputs.values()]


class _Ref(int):
    """A value's place in a flush (an input's, or a recorded op's), in a structure key."""

    __slots__ = ()


def _sig(x: Any, place: dict[int, int]) -> Any:
    t = type(x)
    if t is Value:
        return _Ref(place[id(x)])
    if t is list or t is tuple:  # a compiled call's arguments: every parameter, every step
        return (t, tuple([_Ref(place[id(y)]) if type(y) is Value else _sig(y, place) for y in x]))
    if t is dict:
        return (dict, tuple((k, _sig(v, place)) for k, v in x.items()))
    return (t, x)  # 1, 1.0 and True are equal and hash alike; as arguments they differ


def _structure(order: list[Value], inputs: list[Value], outputs: list[Value]) -> tuple | None:
    """What determines a flush's graph, exactly and hashably (None where an argument cannot be
    hashed): each input's metadata, each op with its arguments (values by their place), and the
    outputs' places. Two flushes of one structure have one canonical graph and keys, so the link
    computes those once per structure, not once per flush."""
    place: dict[int, int] = {}
    parts: list[Any] = []
    for v in inputs:
        place[id(v)] = len(place)
        parts.append(v.key or _key(v))  # its shape, strides and dtype, made once per value
    for v in order:
        parts.append((v.op, _sig(v.args, place), _sig(v.kwargs, place) if v.kwargs else None))
        place[id(v)] = len(place)
    parts.append(tuple(place[id(v)] for v in outputs))
    key = tuple(parts)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _graph_module(order: list[Value], inputs: list[Value], outputs: list[Value], device_type: str) -> Any:
    """The FX graph computing ``outputs`` from ``inputs`` (as ``.graph`` of what is returned: the
    canonical form is all a flush needs, so no module code is generated)."""
    from hypatia.device.compiled import GraphCall

    g = torch.fx.Graph()
    env: dict[int, Any] = {}
    target = torch.device(device_type)

    def arg(x: Any) -> Any:
        return env[id(x)] if isinstance(x, Value) else device_as(x, target)

    for k, v in enumerate(inputs):
        node = g.placeholder(f"in{k}")
        node.meta["val"] = v.meta
        env[id(v)] = node
    for v in order:
        if type(v.op) is GraphCall:  # a compiled graph's call: its nodes, inlined
            env[id(v)] = v.op.inline(g, [map_leaves(arg, a) for a in v.args], target)
            continue
        if v.op is operator.getitem and type(env.get(id(v.args[0]))) is list:
            env[id(v)] = env[id(v.args[0])][v.args[1]]
            continue
        node = g.call_function(v.op, map_leaves(arg, v.args), map_leaves(arg, v.kwargs))
        node.meta["val"] = v.meta
        env[id(v)] = node
    g.output(tuple(env[id(v)] for v in outputs))
    return types.SimpleNamespace(graph=g)


_RECORDER: Recorder | None = None


def recorder() -> Recorder:
    """This process's recorder (asked for at every op: a forked child makes its own, see
    :func:`_forget_after_fork`)."""
    return _RECORDER if _RECORDER is not None else connect()


def _forget_after_fork() -> None:
    """A forked child starts without a session: the parent's tensors are the parent's."""
    global _RECORDER
    _RECORDER = None


os.register_at_fork(after_in_child=_forget_after_fork)


def connect(config: Any = None) -> Recorder:
    """Start this process's device session with the daemon of ``config`` (default: the
    environment's), closing any earlier one: its tensors are released."""
    global _RECORDER
    from hypatia.config import load
    from hypatia.device.link import Link

    if _RECORDER is not None:
        _RECORDER.link.close()
    config = config or load()
    _RECORDER = Recorder(Link(config), config.device_max_ops)
    return _RECORDER


__all__ = ["DeviceWarning", "Recorder", "connect", "recorder"]
