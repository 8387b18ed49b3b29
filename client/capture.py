"""FX graph -> canonical graph: encode ops, arguments and tensor meta as plain data.

Encoding: node references ``["n", i]``; lists ``["l", [...]]``; dtypes ``["dtype", name]``;
devices by *type* only ``["device", "cuda"]``; symbolic sizes ``["sym", expr]``; tensor meta
``["T", shape, stride, dtype, device_type]``; constant tensors by content hash.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
import torch.fx

from hypatia.canonical import CanonicalGraph, RawNode, canonicalize, workload_key


def op_name(node: torch.fx.Node) -> str:
    if node.op in ("placeholder", "get_attr"):
        return node.op
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    if node.op == "call_function":
        module = getattr(target, "__module__", None) or ""
        return f"{module}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}"
    return f"{node.op}:{target}"


def _sym(v: Any) -> list:
    return ["sym", str(v)]


def encode_meta(value: Any, device_type: str | None = None) -> Any:
    """Tensor meta as plain data; ``device_type`` stands for the tensors' own (the hypatia
    device's graphs are recorded on meta tensors and run on the daemon's device)."""
    if isinstance(value, torch.Tensor):
        try:
            stride = [encode_size(s) for s in value.stride()]
        except RuntimeError:  # sparse and other layouts without strides
            stride = None
        return ["T", [encode_size(s) for s in value.shape], stride, str(value.dtype).removeprefix("torch."),
                device_type or value.device.type]
    if isinstance(value, (list, tuple)):
        return ["tuple", [encode_meta(v, device_type) for v in value]]
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _sym(value)
    if isinstance(value, (bool, int, float)):
        return ["scalar", value]
    return None


def encode_size(s: Any) -> Any:
    return s if isinstance(s, int) else str(s)


def tensor_digest(t: torch.Tensor) -> str:
    """Content hash of a constant tensor baked into a graph. AOTAutograd calls its compilers
    under fake mode, so the real constant is read with fake mode switched off; a constant that
    is itself fake has no content to hash and gets a key of its own (it is never shared)."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    if isinstance(t, FakeTensor):
        return f"fake-{id(t):x}-{os.getpid()}"
    with unset_fake_temporarily():
        data = t.detach().to("cpu").contiguous()
        h = hashlib.sha256(str(data.dtype).encode())
        h.update(str(tuple(data.shape)).encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def encode_arg(value: Any, index: dict[torch.fx.Node, int]) -> Any:
    if isinstance(value, torch.fx.Node):
        return ["n", index[value]]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return ["l", [encode_arg(v, index) for v in value]]
    if isinstance(value, torch.dtype):
        return ["dtype", str(value).removeprefix("torch.")]
    if isinstance(value, torch.device):
        return ["device", value.type]
    if isinstance(value, (torch.layout, torch.memory_format)):
        return ["enum", str(value)]
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _sym(value)
    if isinstance(value, slice):
        return ["slice", [encode_arg(v, index) for v in (value.start, value.stop, value.step)]]
    if value is Ellipsis:
        return ["ellipsis"]
    if isinstance(value, torch.Tensor):
        return ["tensor", encode_meta(value), tensor_digest(value)]
    if isinstance(value, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return ["op", str(value)]
    return ["repr", type(value).__qualname__, repr(value)[:200]]


def capture(gm: torch.fx.GraphModule, device_type: str | None = None) -> tuple[CanonicalGraph, list[torch.fx.Node]]:
    """The canonical graph of ``gm`` and, per canonical index, the FX node it stands for
    (``device_type``: see :func:`encode_meta`)."""
    fx_nodes = [n for n in gm.graph.nodes if n.op != "output"]
    index = {n: i for i, n in enumerate(fx_nodes)}
    raw: list[RawNode] = []
    position = 0
    outputs: Any = None
    for node in gm.graph.nodes:
        if node.op == "output":
            outputs = encode_arg(node.args[0], index)
            continue
        meta = encode_meta(node.meta.get("val"), device_type)
        if node.op == "placeholder":
            raw.append(RawNode("placeholder", [position], {}, meta))
            position += 1
        elif node.op == "get_attr":
            value = getattr(gm, node.target) if isinstance(node.target, str) else None
            digest = tensor_digest(value) if isinstance(value, torch.Tensor) else ["repr", type(value).__qualname__]
            raw.append(RawNode("get_attr", [["const", digest]], {}, meta if meta is not None else encode_meta(value)))
        else:
            args = [encode_arg(a, index) for a in node.args]
            kwargs = {k: encode_arg(v, index) for k, v in node.kwargs.items()}
            raw.append(RawNode(op_name(node), args, kwargs, meta))
    graph, order = canonicalize(raw, outputs)
    return graph, [fx_nodes[r] for r in order]


def input_metas(example_inputs: list[Any]) -> list[Any]:
    return [encode_meta(x) if isinstance(x, torch.Tensor) else encode_arg(x, {}) for x in example_inputs]


def graph_workload_key(example_inputs: list[Any], phase: str | None = None) -> tuple[str, list[Any]]:
    """The workload key and metas of these inputs; ``phase`` ("inference" or "training", with
    which inputs require grad) is part of it, since training differentiates the graph."""
    metas = input_metas(example_inputs)
    if phase is not None:
        grads = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
        metas.append(["phase", phase, grads if phase == "training" else []])
    return workload_key(metas)[0], metas


def graph_device(graph: CanonicalGraph) -> str:
    """'cuda' if any tensor in the graph lives on a GPU, else 'cpu' (or the first type seen)."""
    seen = []
    for node in graph.nodes:
        meta = node.meta
        if isinstance(meta, list) and meta and meta[0] == "T":
            seen.append(meta[4])
    if "cuda" in seen:
        return "cuda"
    return seen[0] if seen else "cpu"
