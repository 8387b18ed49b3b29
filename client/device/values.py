"""What a ``hypatia`` tensor stands for on the client: a :class:`Value` (pending, uploading or
held by the daemon) and the :class:`Storage` that tensors sharing memory share.

A value is one of three things, and only moves forward through them:

- *pending*: an op recorded on the client (``op``, ``args``, ``kwargs``), not computed yet;
- *uploading*: a CPU tensor (``cpu``) that goes to the daemon with the next flush;
- *held*: a buffer in the daemon (``handle``), released when the last value naming it is
  garbage collected (the release rides on the next request).

Every value knows its meta tensor (shape, strides, dtype on the ``meta`` device), inferred by
running the op on meta tensors when it was recorded: the client never computes shapes by hand.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import torch

_SEQUENCE = itertools.count()


class Value:
    __slots__ = ("meta", "op", "args", "kwargs", "cpu", "digest", "handle", "release", "seq", "ask", "version", "key",
                 "__weakref__")

    def __init__(self, meta: Any, op: Callable | None = None, args: tuple = (), kwargs: dict | None = None,
                 cpu: torch.Tensor | None = None):
        self.meta = meta
        self.op = op
        self.args = args
        self.kwargs = kwargs or {}
        self.cpu = cpu
        self.digest: str | None = None
        self.handle: int | None = None
        self.release: Callable[[int], None] | None = None
        self.seq = next(_SEQUENCE)  # creation order: a flush's outputs are ordered by it, so keys repeat
        self.ask = False  # an upload the daemon may hold already (a parameter): its digest goes first
        self.version = cpu._version if cpu is not None else 0  # an upload's CPU tensor as it was moved
        self.key: tuple | None = None  # its metadata as a meta-cache key, made when first needed

    @property
    def pending(self) -> bool:
        return self.op is not None

    def held(self, handle: int, release: Callable[[int], None]) -> None:
        """The daemon holds this value under ``handle`` now: drop what made it."""
        self.handle, self.release = handle, release
        self.op, self.args, self.kwargs, self.cpu = None, (), {}, None

    def __del__(self) -> None:
        if self.handle is not None and self.release is not None:
            self.release(self.handle)


class Storage:
    """The memory that a tensor and its views share: its current ``value`` (a view's value is
    derived from it) and a ``version`` that each write bumps, so views know to re-derive."""

    __slots__ = ("value", "version", "__weakref__")

    def __init__(self, value: Value):
        self.value = value
        self.version = 0


def meta_like(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``t``'s shape, strides and dtype."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


SNAPSHOT_BELOW = 16 << 20  # smaller CPU tensors are copied when they go to the device


def upload_value(t: torch.Tensor) -> Value:
    """A value that uploads the CPU tensor ``t`` with the next flush. A small tensor is copied
    now (a batch buffer the loader refills must go up as it was); a large one (a parameter) is
    sent as it is then, and checked not to have been written since (see :mod:`.link`)."""
    weight = isinstance(t, torch.nn.Parameter)
    t = t.detach()
    if t.numel() * t.element_size() < SNAPSHOT_BELOW:
        t = t.clone()
    v = Value(meta_like(t), cpu=t)
    v.ask = weight
    v.digest = None
    v.args = (t._version,)
    return v


def names_device(x: Any) -> bool:
    """True for the hypatia device as an op argument: a ``torch.device`` or a string."""
    return isinstance(x, torch.device) and x.type == "hypatia" or isinstance(x, str) and x.startswith("hypatia")


def device_as(x: Any, target: Any) -> Any:
    """``x``, or ``target`` where ``x`` names the hypatia device: how an op's device arguments
    read on meta tensors, on the client's CPU, or in the daemon."""
    return target if names_device(x) else x


def map_leaves(fn: Callable[[Any], Any], x: Any) -> Any:
    """``fn`` applied to every leaf of nested lists, tuples and dicts (an op's arguments): the
    recorder's hot path, much cheaper than a general pytree walk."""
    t = type(x)
    if t is list:
        return [map_leaves(fn, y) for y in x]
    if t is tuple:
        return tuple(map_leaves(fn, y) for y in x)
    if t is dict:
        return {k: map_leaves(fn, v) for k, v in x.items()}
    return fn(x)


def leaves(x: Any) -> list[Any]:
    """The leaves of nested lists, tuples and dicts, in order."""
    out: list[Any] = []
    map_leaves(out.append, x)
    return out
