"""``torch.compile(model, backend="hypatia")`` on a model on the hypatia device: whole graphs
instead of op traces.

A :class:`~hypatia.device.tensor.HypatiaTensor` is a traceable wrapper subclass: flattened, it
is one inner tensor, a meta tensor of its metadata. Dynamo traces the model on fake copies of
those, and AOTAutograd traces through the subclass to a graph of ATen ops on the inner tensors
(forward, and backward in training). Hypatia's compiler for those graphs (:class:`Recorded`)
records each call of one as a single step of the recorder: its inputs are named by their inner
meta tensors, which AOTAutograd hands over as they are, and its outputs are fresh meta tensors
that AOTAutograd wraps back into hypatia tensors (:func:`unflatten`) holding the call's output
values. At the next flush the graph is inlined into the flushed graph, which is keyed and run
in the daemon like any other; a step costs one recorded call, not one per op.

Device arguments naming the hypatia device become ``meta`` in the traced graphs (the inner
tensors are meta tensors), and ``meta`` stands for the daemon's device when they run. In
training, AOTAutograd's forward and backward are each one recorded call; a gradient autograd
made outside the graph (of the loss) is named by its storage, since AOTAutograd may flatten a
temporary alias of it. A graph that cannot be traced this way (dynamic shapes, say) runs as it
is: each op recorded on its own, as without ``torch.compile``, with one warning.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections import Counter
from typing import Any, Callable

import torch
import torch.fx
from torch.fx.node import map_aggregate

from hypatia.device.values import Value, device_as, leaves, map_leaves, meta_like, names_device

log = logging.getLogger("hypatia.client")

_META = torch.device("meta")
_BY_INNER: dict[int, tuple[weakref.ref, Any, bool]] = {}  # id(inner) -> (it, a tensor on its storage, contiguous?), while it lives
_MADE: dict[int, tuple[weakref.ref, Value]] = {}  # id(output meta) -> (it, its value), by compiled calls
_MADE_PRUNE_AT = 1 << 14
counters: Counter = Counter()


class CompileWarning(RuntimeWarning):
    """A graph of a model on the hypatia device runs op by op under torch.compile."""


def name_inner(t: Any, inner: torch.Tensor) -> torch.Tensor:
    """``inner`` (a meta tensor) names ``t``'s memory while compiled graphs run, for as long as
    ``inner`` lives: AOTAutograd may flatten a temporary (a detached gradient) and keep only the
    inner tensor, so the name holds a tensor of its own on ``t``'s storage."""
    from hypatia.device.tensor import HypatiaTensor

    key = id(inner)
    alias = HypatiaTensor(meta_like(t), t._hstorage, t._chain)
    _BY_INNER[key] = (weakref.ref(inner, lambda _, key=key: _BY_INNER.pop(key, None)), alias, alias.is_contiguous())
    return inner


def _named(inner: Any) -> Any:
    """The tensor ``inner`` names (see :func:`name_inner`), or None."""
    found = _BY_INNER.get(id(inner))
    return found[1] if found is not None and found[0]() is inner else None


def unflatten(inner: torch.Tensor) -> Any:
    """The hypatia tensor for an inner tensor: a traced one while Dynamo or AOTAutograd traces;
    when a compiled graph has run, the tensor of the output value it made (or the input it
    returned as it is)."""
    from hypatia.device.tensor import HypatiaTensor, new_tensor

    if type(inner) is torch.Tensor and inner.device.type == "meta":
        made = _MADE.get(id(inner))
        if made is not None and made[0]() is inner:
            from hypatia.device.trace import recorder

            return new_tensor(inner, made[1], recorder())
        found = _named(inner)
        if found is not None:
            return found
        raise RuntimeError("a compiled graph on the hypatia device returned a tensor it did not make; "
                           "run the model without torch.compile and report this")
    return HypatiaTensor(inner, None, traced=inner)


def traced_op(func: Any, args: tuple, kwargs: dict) -> Any:
    """``func`` while a compiled graph is traced: run on the inner (fake) tensors, its outputs
    wrapped as traced hypatia tensors, with torch's aliasing rules for what it returns. A real
    hypatia tensor among them (a constant the traced code made, such as an empty cache) takes
    part as a fake copy of its inner tensor."""
    from torch._guards import detect_fake_mode
    from torch.utils._python_dispatch import return_and_correct_aliasing

    from hypatia.device.tensor import HypatiaTensor

    fake_mode = detect_fake_mode([x._traced for x in leaves((args, kwargs)) if type(x) is HypatiaTensor
                                  and x._traced is not None])

    def inner(x: Any) -> Any:
        if type(x) is HypatiaTensor:
            if x._traced is not None:
                return x._traced
            return fake_mode.from_tensor(x._inner) if fake_mode is not None else x._inner
        if isinstance(x, torch.Tensor) and names_device(x.device):  # a factory's fake, as Dynamo traced it
            return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=_META)
        return device_as(x, _META)

    out = func(*map_leaves(inner, args), **map_leaves(inner, kwargs))
    wrapped = map_leaves(lambda t: HypatiaTensor(t, None, traced=t) if isinstance(t, torch.Tensor) else t, out)
    return return_and_correct_aliasing(func, args, kwargs, wrapped)


class GraphCall:
    """A compiled graph as one recorded step: ``inline`` puts its nodes into a flushed graph."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.size = sum(1 for n in gm.graph.nodes if n.op == "call_function")

    def inline(self, g: torch.fx.Graph, args: list[Any], target: torch.device) -> list[Any]:
        """The nodes of the graph added to ``g`` on ``args`` (nodes or plain values); its outputs."""
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        val_map: dict[torch.fx.Node, Any] = {}
        for p, a in zip(placeholders, args):
            val_map[p] = a
        before = set(g.nodes)
        out = g.graph_copy(self.gm.graph, val_map)
        for node in g.nodes:  # ``meta`` in the traced graph is the daemon's device
            if node not in before and node.op == "call_function":
                node.args = map_aggregate(node.args, lambda x: target if _names_meta(x) else x)
                node.kwargs = map_aggregate(node.kwargs, lambda x: target if _names_meta(x) else x)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def __repr__(self) -> str:
        return f"GraphCall({self.size} ops)"


def _names_meta(x: Any) -> bool:
    return isinstance(x, torch.device) and x.type == "meta"


class Recorded:
    """AOTAutograd's compiled function for one traced graph: each call records the graph as one
    step (see the module docstring)."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.constants = constants_as_inputs(gm)
        self._constant_values: dict[int, Value] = {}
        self.call = GraphCall(gm)
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        outputs = gm.graph.output_node().args[0]
        with unset_fake_temporarily():  # AOTAutograd compiles under its fake mode: these are real meta tensors
            self.metas = [meta_like(n.meta["val"]) if isinstance(n, torch.fx.Node) else None for n in outputs]
        if any(m is None and n is not None for m, n in zip(self.metas, outputs)):
            raise NotTraceable("the graph returns something other than tensors")  # None: a gradient not needed

    def __call__(self, *args: Any) -> list[torch.Tensor]:
        from hypatia.device import tensor as ht
        from hypatia.device.trace import recorder

        with ht._lock:
            rec = recorder()
            values = _values(args, rec) + [self._constant(k, rec) for k in range(len(self.constants))]
            parent = rec.record_inferred(self.call, values, {}, self.metas)
            rec.count("compiled_calls")
            rec.count("compiled_ops", self.call.size)
            outs = []
            for v, m in zip(parent, self.metas):
                if m is None:
                    outs.append(None)
                    continue
                fresh = meta_like(m)
                _MADE[id(fresh)] = (weakref.ref(fresh), v)
                outs.append(fresh)
            if len(_MADE) > _MADE_PRUNE_AT:
                for key in [k for k, (ref, _) in _MADE.items() if ref() is None]:
                    del _MADE[key]
            if rec._recorded >= rec.max_ops:
                rec.maybe_flush()
            return outs

    def _constant(self, k: int, rec: Any) -> Any:
        """The value of the graph's ``k``-th constant: a hypatia tensor's current value, or a
        CPU tensor uploaded once and kept for every call."""
        from hypatia.device.tensor import HypatiaTensor, value_of
        from hypatia.device.values import upload_value

        c = self.constants[k]
        if type(c) is torch.Tensor and c.device.type == "meta":  # a hypatia tensor's inner tensor
            c = _named(c)
            if c is None:
                raise NotTraceable("a compiled graph reads a hypatia tensor that is gone")
        if type(c) is HypatiaTensor:
            return value_of(c, rec)
        found = self._constant_values.get(k)
        if found is None:
            found = self._constant_values[k] = upload_value(c)
        return found


def _values(args: tuple, rec: Any) -> list[Any]:
    """The values of a compiled call's arguments (AOTAutograd's inner tensors and plain values).
    Every step walks every parameter, so the common case (an inner tensor naming a tensor
    without views) is read in the loop itself."""
    from hypatia.device.tensor import value_of
    from hypatia.device.values import upload_value

    out = []
    by_inner, made, tensor = _BY_INNER, _MADE, torch.Tensor
    for a in args:
        if not isinstance(a, tensor):
            out.append(a)
            continue
        found = by_inner.get(id(a))
        if found is not None and found[0]() is a:
            t = found[1]
            v = value_of(t, rec) if t._chain else t._hstorage.value
            if not found[2]:  # traced as its inner tensor, which is contiguous
                v = rec.record(torch.ops.aten.clone.default, v, memory_format=torch.contiguous_format)
            out.append(v)
            continue
        output = made.get(id(a))
        if output is not None and output[0]() is a:  # an output of an earlier call (saved for backward)
            out.append(output[1])
        elif a.device.type == "cpu":  # a CPU tensor the graph reads (a constant, a CPU input)
            out.append(upload_value(a))
        else:
            raise NotTraceable(f"a compiled graph got a {a.device} tensor that is not on the hypatia device")
    return out


def constants_as_inputs(gm: torch.fx.GraphModule) -> list[Any]:
    """The tensors ``gm`` reads as attributes (constants AOTAutograd lifted), made inputs after
    its own (so a flushed graph carries them as values); the tensors, in that order."""
    def take(value: Any, target: str) -> bool:
        if not isinstance(value, torch.Tensor):
            raise NotTraceable(f"the graph reads {target}, a {type(value).__name__}")
        return True

    lifted = _attributes_as_inputs(gm, take, "constant")
    for p, value in lifted:
        p.meta["val"] = value
    return [value for _, value in lifted]


def _attributes_as_inputs(gm: torch.fx.GraphModule, take: Callable[[Any, str], bool],
                          prefix: str) -> list[tuple[torch.fx.Node, Any]]:
    """The attributes ``gm`` reads that ``take`` accepts, made placeholders after its own (named
    ``prefix_k``, with the attribute node's metadata); each placeholder with its value."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    lifted: list[tuple[torch.fx.Node, Any]] = []
    for node in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        if not take(value, node.target):
            continue
        with gm.graph.inserting_after(placeholders[-1]) if placeholders else gm.graph.inserting_before():
            p = gm.graph.placeholder(f"{prefix}_{len(lifted)}")
        p.meta.update(node.meta)
        node.replace_all_uses_with(p)
        gm.graph.erase_node(node)
        placeholders.append(p)
        lifted.append((p, value))
    if lifted:
        gm.recompile()
    return lifted


class NotTraceable(RuntimeError):
    """A graph that the hypatia device cannot run whole."""


def _device_constants_as_inputs(gm: torch.fx.GraphModule) -> list[Any]:
    """Hypatia tensors Dynamo's graph holds as constants (ones the traced code made, such as an
    empty cache), made inputs after its own: AOTAutograd traces a subclass input, not a subclass
    constant. The tensors, in that order."""
    from hypatia.device.tensor import HypatiaTensor

    def take(value: Any, target: str) -> bool:
        return type(value) is HypatiaTensor and value._traced is None

    return [value for _, value in _attributes_as_inputs(gm, take, "device_constant")]


_FROM_DATA = (torch.tensor, torch.as_tensor)


def _devices_to_meta(gm: torch.fx.GraphModule) -> None:
    """Device arguments naming the hypatia device become ``meta`` in Dynamo's graph, where the
    inner tensors live. A tensor made from data (``torch.tensor([], device=...)``) is made on the
    CPU and moved, since AOTAutograd fakes a CPU constant but not one made on ``meta``."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _FROM_DATA and names_device(node.kwargs.get("device")):
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "device"}
            with gm.graph.inserting_after(node):
                moved = gm.graph.call_method("to", (node, _META))
            node.replace_all_uses_with(moved, delete_user_cb=lambda user: user is not moved)
            moved.meta.update(node.meta)
    for node in gm.graph.nodes:
        node.args = map_aggregate(node.args, lambda x: _META if names_device(x) else x)
        node.kwargs = map_aggregate(node.kwargs, lambda x: _META if names_device(x) else x)
    gm.recompile()


def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """Hypatia's backend for a Dynamo graph of hypatia tensors: AOTAutograd's graphs recorded
    whole (see the module docstring), or, where that fails, ``gm`` as it is."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from hypatia.client.graphs import copy_of

    def compiler(fx: torch.fx.GraphModule, inputs: list[Any]) -> Callable[..., Any]:
        return make_boxed_func(Recorded(fx))

    try:
        if any(not isinstance(x, torch.Tensor) for x in example_inputs):
            raise NotTraceable("dynamic shapes: the graph takes sizes as inputs")
        traced = copy_of(gm, gm)  # gm itself stays as it is, to run op by op if this fails
        _devices_to_meta(traced)
        extra = _device_constants_as_inputs(traced)
        compiled = aot_autograd(fw_compiler=compiler, bw_compiler=compiler, inference_compiler=compiler)(
            traced, [*example_inputs, *extra])
        counters["graphs_compiled"] += 1
        if not extra:
            return compiled
        if getattr(compiled, "_boxed_call", False):
            def boxed(args: list) -> Any:
                return compiled([*args, *extra])
            boxed._boxed_call = True  # type: ignore[attr-defined]
            return boxed
        return lambda *args: compiled(*args, *extra)
    except Exception as exc:  # noqa: BLE001 - the graph still runs, op by op
        counters["graphs_op_by_op"] += 1
        log.info("a graph on the hypatia device runs op by op: %s: %s", type(exc).__name__, exc)
        warnings.warn(f"torch.compile on the hypatia device: this graph runs op by op ({type(exc).__name__}: "
                      f"{str(exc)[:300]})", CompileWarning, stacklevel=2)
        return gm.forward


__all__ = ["CompileWarning", "GraphCall", "NotTraceable", "Recorded", "compile_graph", "constants_as_inputs", "counters"]
