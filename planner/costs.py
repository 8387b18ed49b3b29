"""The static cost model (HEURISTIC policy): FLOPs and bytes against a device's ceilings.

A kernel launch costs ``max(flops / peak, bytes / bandwidth) + launch``; views cost nothing.
The ceilings are the environment's measured ones (:func:`hypatia.planner.measure.ceilings`,
stored with the environment); until they are measured the defaults below stand in: round
figures for a current data-centre GPU and one CPU core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from hypatia.canonical import CanonicalGraph, refs
from hypatia.planner.rules import tensor_meta


@dataclass(frozen=True)
class Ceilings:
    flops_per_s: float
    bytes_per_s: float
    launch_s: float
    dispatch_s: float  # host time to dispatch one op (or one fused call) from the FX graph
    half_flops_per_s: float = 0.0  # 16-bit matrix rate; 0 means "as fp32"

    def flops_rate(self, dtype: str | None) -> float:
        if dtype in ("bfloat16", "float16") and self.half_flops_per_s > 0:
            return self.half_flops_per_s
        return self.flops_per_s


DEFAULT_CEILINGS = {
    "cuda": Ceilings(flops_per_s=60e12, bytes_per_s=3.0e12, launch_s=5e-6, dispatch_s=4e-6, half_flops_per_s=600e12),
    "cpu": Ceilings(flops_per_s=1e11, bytes_per_s=1.5e10, launch_s=2e-6, dispatch_s=3e-6),
}
DEFAULT_TRANSFER_BYTES_PER_S = 2.5e10  # host <-> GPU over PCIe 4/5, pageable
DEFAULT_TRANSFER_LATENCY_S = 1e-5  # one pageable copy, which also makes the host wait for the device


@dataclass(frozen=True)
class CostModel:
    """Ceilings per device type, and the host <-> device copy bandwidth."""

    devices: dict
    transfer_bytes_per_s: float = DEFAULT_TRANSFER_BYTES_PER_S
    transfer_latency_s: float = DEFAULT_TRANSFER_LATENCY_S
    measured: bool = False

    def ceilings(self, device: str) -> Ceilings:
        return self.devices.get(device) or DEFAULT_CEILINGS.get(device) or DEFAULT_CEILINGS["cpu"]

    def transfer_s(self, nbytes: int) -> float:
        """One copy between host and device: its latency, then the bytes at the copy bandwidth."""
        return self.transfer_latency_s + nbytes / self.transfer_bytes_per_s


def cost_model(measured: dict | None = None) -> CostModel:
    """The model for an environment's stored ceilings (see ``measure.ceilings``), or defaults."""
    if not measured:
        return CostModel(dict(DEFAULT_CEILINGS))
    fields = ("flops_per_s", "bytes_per_s", "launch_s", "dispatch_s", "half_flops_per_s")
    devices = dict(DEFAULT_CEILINGS)
    for device, values in measured.items():
        if isinstance(values, dict) and all(isinstance(values.get(f), (int, float)) for f in fields):
            devices[device] = Ceilings(**{f: float(values[f]) for f in fields})
    def positive(name: str, default: float) -> float:
        value = measured.get(name)
        return float(value) if isinstance(value, (int, float)) and value > 0 else default

    return CostModel(devices, positive("transfer_bytes_per_s", DEFAULT_TRANSFER_BYTES_PER_S),
                     positive("transfer_latency_s", DEFAULT_TRANSFER_LATENCY_S), measured=True)

ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "bool": 1, "uint8": 1, "int8": 1}

# Ops that only relabel memory: no launch, no traffic.
VIEW_OPS = frozenset(
    {
        "aten.view.default", "aten._unsafe_view.default", "aten.expand.default", "aten.t.default",
        "aten.transpose.int", "aten.permute.default", "aten.select.int", "aten.slice.Tensor",
        "aten.unsqueeze.default", "aten.squeeze.dim", "aten.alias.default", "aten.reshape.default",
        "_operator.getitem", "placeholder", "get_attr",
    }
)


def _numel(shape: Any) -> int:
    if not isinstance(shape, list) or not all(isinstance(s, int) for s in shape):
        return 1024  # symbolic sizes: a modest guess
    return math.prod(shape) if shape else 1


def tensor_bytes(meta: Any) -> int:
    m = tensor_meta(meta)
    if m is None:
        if isinstance(meta, list) and meta and meta[0] == "tuple":
            return sum(tensor_bytes(x) for x in meta[1])
        return 0
    return _numel(m[0]) * ITEMSIZE.get(m[1], 4)


def node_flops(graph: CanonicalGraph, i: int) -> float:
    node = graph.nodes[i]
    m = tensor_meta(node.meta)
    out = _numel(m[0]) if m else 1
    if node.op in ("aten.addmm.default", "aten.mm.default", "aten.bmm.default"):
        a = [r for r in refs(node.args)]
        k_from = a[-2] if len(a) >= 2 else None
        mk = tensor_meta(graph.nodes[k_from].meta) if k_from is not None else None
        k = mk[0][-1] if mk and mk[0] and isinstance(mk[0][-1], int) else 64
        return 2.0 * out * k
    if node.op == "aten.convolution.default":
        w = list(refs(node.args[1:2]))
        mw = tensor_meta(graph.nodes[w[0]].meta) if w else None
        per = _numel(mw[0][1:]) if mw else 64
        return 2.0 * out * per
    return float(out)


def node_dtype(graph: CanonicalGraph, i: int) -> str | None:
    m = tensor_meta(graph.nodes[i].meta)
    return m[1] if m else None


def node_device(graph: CanonicalGraph, i: int) -> str:
    m = tensor_meta(graph.nodes[i].meta)
    return m[2] if m else "cpu"


def node_cost(graph: CanonicalGraph, i: int, ceilings: Ceilings) -> float:
    """Estimated seconds for the ATen op of node ``i`` run on its own."""
    node = graph.nodes[i]
    if node.op in VIEW_OPS:
        return ceilings.dispatch_s / 2
    traffic = tensor_bytes(node.meta) + sum(tensor_bytes(graph.nodes[j].meta) for j in set(refs(node.args)))
    rate = ceilings.flops_rate(node_dtype(graph, i))
    return ceilings.dispatch_s + ceilings.launch_s + max(node_flops(graph, i) / rate, traffic / ceilings.bytes_per_s)


def region_cost(graph: CanonicalGraph, nodes: Iterable[int], inputs: Iterable[int], root: int, launches: int, ceilings: Ceilings) -> float:
    """Estimated seconds for a fused kernel over ``nodes``: the same FLOPs, but only the
    inputs are read and only the result is written."""
    flops = sum(node_flops(graph, i) for i in nodes if graph.nodes[i].op not in VIEW_OPS)
    rate = ceilings.flops_rate(node_dtype(graph, root))
    return ceilings.dispatch_s + launches * ceilings.launch_s + max(flops / rate, io_bytes(graph, inputs, root) / ceilings.bytes_per_s)


def io_bytes(graph: CanonicalGraph, inputs: Iterable[int], root: int) -> int:
    """Bytes a fused region reads (its inputs) and writes (its result)."""
    return tensor_bytes(graph.nodes[root].meta) + sum(tensor_bytes(graph.nodes[j].meta) for j in set(inputs))
