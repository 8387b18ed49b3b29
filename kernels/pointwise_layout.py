"""The memory layout of a pointwise program's output (its optional ``"order"``).

A fused chain must return its output with the layout the unfused ops gave it: the graph's later
``view`` nodes were traced against that layout (a rotary embedding applied to a transposed
query keeps the transposed layout, as TensorIterator does, and a later view relies on it).
The kernels compute in memory order, on permuted views of their inputs, and hand back the
result permuted to the program's shape, so it is dense in that order with no extra copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from hypatia.kernels.pointwise import Program


def dense_order(shape: Any, stride: Any) -> list[int] | None:
    """The dims of a tensor of ``shape`` and ``stride``, outermost first in memory, or None
    where that is not a dense, non-overlapping layout. Dims of size 1 take no memory: their
    strides do not matter, as in ``view``."""
    if 0 in shape:
        return None
    dims = sorted(range(len(shape)), key=lambda d: (-stride[d], d))
    expected = 1
    for d in reversed(dims):
        if shape[d] != 1 and stride[d] != expected:
            return None
        expected *= shape[d]
    return dims


def is_row_major(shape: Any, order: list[int]) -> bool:
    big = [d for d in order if shape[d] != 1]
    return big == sorted(big)


def order_of(shape: Any, stride: Any) -> list[int] | None:
    """The ``order`` that gives an output of ``shape`` the layout of ``stride``: None where
    that is row-major or not a dense, non-overlapping layout (then the graph copies if needed)."""
    order = dense_order(shape, stride)
    return None if order is None or is_row_major(shape, order) else order


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` have one shape and the same strides wherever a dim has more
    than one element (all that ``view`` and the kernels read)."""
    return a.shape == b.shape and all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def with_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """``t`` copied to the dense layout of ``like`` (None where ``like`` is not dense)."""
    order = dense_order(tuple(like.shape), like.stride())
    if order is None:
        return None
    inverse = [0] * len(order)
    for position, d in enumerate(order):
        inverse[d] = position
    return t.permute(order).contiguous().permute(inverse)


def in_order(t: torch.Tensor, prog: Program) -> torch.Tensor:
    """Input ``t`` seen in the program's memory order (0-dim tensors, which may be CPU
    scalars beside CUDA inputs, broadcast as they are)."""
    if prog.order is None or t.dim() == 0:
        return t
    rank = len(prog.shape)
    return t.view((1,) * (rank - t.dim()) + tuple(t.shape)).permute(prog.order)


def from_order(t: torch.Tensor, prog: Program) -> torch.Tensor:
    """The kernel's result, computed in memory order, seen in the program's ``shape``."""
    if prog.order is None:
        return t
    inverse = [0] * len(prog.order)
    for position, d in enumerate(prog.order):
        inverse[d] = position
    return t.permute(inverse)

