"""What an ATen op does to the ``hypatia`` device's bookkeeping, read from its schema: whether
it is a view (its output shares memory with an input), whether it writes into its arguments
(and then which functional op computes the same values), and how a write through a view is
carried back into the memory the view looks at (the ``*_scatter`` ops).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

aten = torch.ops.aten

# In-place ops whose functional twin is not the name without the trailing underscore.
_FUNCTIONAL_NAMES = {"normal_": ("normal_functional", None), "bernoulli_": ("bernoulli", "p")}


class Unsupported(RuntimeError):
    """An operation the hypatia device cannot record; the message says what to do instead."""


@functools.lru_cache(maxsize=None)
def mutated_args(op: torch._ops.OpOverload) -> list[str]:
    """Names of the arguments ``op`` writes into (``Tensor(a!)``), in schema order."""
    return [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]


@functools.lru_cache(maxsize=None)
def is_view(op: torch._ops.OpOverload) -> bool:
    """True for an op whose outputs alias its first argument without writing it."""
    returns = op._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


@functools.lru_cache(maxsize=None)
def functional(op: torch._ops.OpOverload) -> torch._ops.OpOverload:
    """The op that computes what ``op`` writes, without writing: ``add_`` -> ``add``,
    ``add.out`` -> ``add.Tensor``; :class:`Unsupported` when torch has none."""
    name, overload = op._schema.name.split("::")[1], op._overloadname
    candidates = []
    if overload == "out" or overload.endswith("_out"):
        base = overload[:-4] if overload.endswith("_out") else "default"
        candidates += [(name, base), (name, "Tensor" if base == "default" else base)]
    if name.endswith("_"):
        new_name, new_overload = _FUNCTIONAL_NAMES.get(name, (name[:-1], None))
        candidates += [(new_name, new_overload or overload), (new_name, "default")]
    for packet, ov in candidates:
        found = getattr(getattr(aten, packet, None), ov, None)
        if isinstance(found, torch._ops.OpOverload) and not mutated_args(found):
            return found
    raise Unsupported(f"{op} writes into its arguments and has no functional twin the hypatia device can record; "
                      "compute the result out of place (e.g. `y = x + 1` rather than `x.add_(1)`)")


def _inverse_permutation(dims: list[int]) -> list[int]:
    out = [0] * len(dims)
    for i, d in enumerate(dims):
        out[d % len(dims)] = i
    return out


def scatter_back(step: tuple, base: Any, new: Any, record: Callable[..., Any]) -> Any:
    """The value of ``base`` once its view ``step`` (op, args after the first, kwargs, output
    index) is replaced by ``new``; ``record(op, *args)`` records an op on values."""
    op, rest, kwargs, index = step
    packet = op.overloadpacket
    full = dict(zip((a.name for a in op._schema.arguments[1:]), rest)) | kwargs
    if packet is aten.slice:
        return record(aten.slice_scatter.default, base, new, full.get("dim", 0), full.get("start"), full.get("end"),
                      full.get("step", 1))
    if packet is aten.select:
        return record(aten.select_scatter.default, base, new, full["dim"], full["index"])
    if packet is aten.diagonal:
        return record(aten.diagonal_scatter.default, base, new, full.get("offset", 0), full.get("dim1", 0),
                      full.get("dim2", 1))
    if packet is aten.as_strided:
        return record(aten.as_strided_scatter.default, base, new, full["size"], full["stride"], full.get("storage_offset"))
    if packet in (aten.alias, aten.detach, aten.lift_fresh):
        return new
    if packet is aten.t:
        return record(aten.t.default, new)
    if packet is aten.transpose:
        return record(aten.transpose.int, new, full["dim0"], full["dim1"])
    if packet is aten.permute:
        return record(aten.permute.default, new, _inverse_permutation(list(full["dims"])))
    if packet is aten.unbind:
        return record(aten.select_scatter.default, base, new, full.get("dim", 0), index)
    if packet in (aten.split, aten.split_with_sizes):
        dim = full.get("dim", 0)
        length = base.meta.shape[dim]
        if packet is aten.split:
            size = full["split_size"]
            start, end = index * size, min((index + 1) * size, length)
        else:
            sizes = list(full["split_sizes"])
            start, end = sum(sizes[:index]), sum(sizes[: index + 1])
        return record(aten.slice_scatter.default, base, new, dim, start, end, 1)
    if packet in (aten.view, aten._unsafe_view, aten.reshape, aten._reshape_alias, aten.unsqueeze, aten.squeeze,
                  aten.flatten, aten.view_as, aten.unflatten, aten.expand):
        return record(aten.reshape.default, new, list(base.meta.shape))
    raise Unsupported(f"writing through a view made by {op} is not supported on the hypatia device; "
                      "clone() the view, write the clone, and assign it back")
