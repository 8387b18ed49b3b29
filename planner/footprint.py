"""What running a rebuilt graph allocates, found before it runs.

The hypatia device runs graphs that clients registered, on the daemon's memory: a few bytes of
graph can ask for ``expand`` to 2**28 rows and a ``clone`` of it. Every node is therefore first run on
fake tensors (shapes, strides and dtypes, no data) with the shapes the graph's inputs have, and
the bytes of new storage alive at each step are added up as the graph would hold and free them:
an FX graph drops a value after its last use, and a view keeps its base's storage alive. The
daemon compares that peak against the memory its device has free before it runs the graph for
real. Operators without a fake implementation, and those whose output sizes depend on
the data (``nonzero``, ``item``), cannot be sized in advance: :class:`NotSizeable`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from hypatia.shm import span


class NotSizeable(Exception):
    """The graph's memory cannot be known before it runs; the message says which node."""


@dataclass(frozen=True)
class Footprint:
    outputs: int  # bytes of the tensor outputs as they are written to shared memory
    peak: int  # the most bytes of new storage alive at once (the inputs' own not counted)
    peak_at: str  # the node at which the peak is reached, for messages


def written_bytes(t: torch.Tensor) -> int:
    """Bytes of the segment :func:`hypatia.shm.put` writes for ``t``: its storage span, or every
    element once where its strides overlap (such a tensor travels contiguous)."""
    return max(t.numel(), span(t.shape, t.stride())) * t.element_size() if t.numel() else 0


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors in ``value`` (a tensor, or lists, tuples and dicts of them), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    return []


def footprint(gm: torch.fx.GraphModule, inputs: list[tuple[list[int], str]], device: Any = None) -> Footprint:
    """The footprint of ``gm`` on contiguous inputs of these (shape, dtype name) on ``device``
    (the CPU by default); nothing real is allocated. Raises :class:`NotSizeable`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position[u] for u in n.users), default=position[n]) for n in nodes}
    sizes: dict[int, int] = {}  # new storage alive now -> its bytes
    holders: dict[int, set[torch.fx.Node]] = {}  # new storage alive now -> the nodes that hold it
    held: dict[torch.fx.Node, set[int]] = {}  # node alive now -> the new storages it holds
    given: set[int] = set()  # the inputs' storages: not the run's to allocate
    peak, peak_at = 0, "the inputs"
    interpreter = torch.fx.Interpreter(gm)
    with FakeTensorMode(allow_fallback_kernels=False):
        for i, node in enumerate(nodes):
            where = f"node {i} ({node.target})" if node.op != "output" else "the outputs"
            try:
                if node.op == "placeholder":
                    shape, dtype = inputs[len(given)]
                    value = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                    given.add(value.untyped_storage()._cdata)
                else:
                    value = interpreter.run_node(node)
            except Exception as exc:  # noqa: BLE001 - fake kernels raise many types; none may reach the daemon
                raise NotSizeable(f"{where} cannot be sized before it runs: {type(exc).__name__}: {exc}"[:400]) from None
            interpreter.env[node] = value
            if node.op == "output":
                return Footprint(sum(written_bytes(t) for t in tensors_in(value)), peak, peak_at)
            held[node] = set()
            for t in tensors_in(value):
                sid = t.untyped_storage()._cdata
                if sid in given:
                    continue
                if sid not in sizes:  # no live node holds it: this node allocated it
                    sizes[sid], holders[sid] = t.untyped_storage().nbytes(), set()
                holders[sid].add(node)
                held[node].add(sid)
            if sum(sizes.values()) > peak:
                peak, peak_at = sum(sizes.values()), where
            for done in [n for n in held if last_use[n] <= i]:  # values an FX graph drops after this node
                for sid in held.pop(done):
                    holders[sid].discard(done)
                    if not holders[sid]:
                        del sizes[sid], holders[sid]
    raise NotSizeable("the graph has no output node")
