"""Accelerator adapters: fused regions run by a team's own accelerator, where its constraints hold.

An :class:`AcceleratorAdapter` states what an accelerator takes (dtypes, ATen operators, a memory
limit) and compiles a region for it. Adapters live in the user's process (the daemon plans for
every process and never sees them), so the client places regions after it has its plan: each
fused region of an inference graph is checked against the registered adapters in registration
order, and the first one under which it has no violation runs it. Such a region keeps the plan's
boundaries but its ``placement`` is the adapter's name; in the rewritten graph it is one
``hypatia_adapter::run`` operator (opaque to Inductor and export, with its output's shape from
the model graph) that calls what the adapter compiled from the region's unfused ATen nodes. A
region with a violation stays where the plan put it (device or host); every violation is
counted (``adapter.<name>.violations.<op|dtype|memory>``) and recorded, naming the node that
caused it, in the session's ``violations``. Training graphs are left as planned (the operator
has no backward) and counted (``adapter.<name>.training_skipped``). With no adapter registered
nothing changes. Adapters are consulted when a graph is compiled: register one before
``torch.compile`` runs the model (``torch._dynamo.reset()`` recompiles).
"""

from __future__ import annotations

import itertools
import logging
import operator
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, MutableSequence

import torch
import torch.fx

from hypatia.client.capture import op_name
from hypatia.planner.footprint import tensors_in
from hypatia.planner.plan import PLACEMENTS, Plan, Region

log = logging.getLogger("hypatia.client")

KINDS = ("op", "dtype", "memory")


class AdapterError(Exception):
    """An adapter that cannot be registered, or a region it cannot run."""


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, eq=False)
class AcceleratorAdapter:
    """An accelerator's constraints and compiler. ``dtypes`` (``torch.dtype`` or names such as
    ``"float16"``), ``ops`` (ATen overload names such as ``"aten.mm.default"``) and
    ``memory_bytes`` (the most bytes a region's inputs, intermediates and output may hold) are
    limits; None means no limit. Subclasses implement :meth:`compile`."""

    name: str
    dtypes: frozenset | None = None
    ops: frozenset | None = None
    memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name or "") or self.name in PLACEMENTS:
            raise AdapterError(f"adapter name {self.name!r}: letters, digits, _ and - only, not {PLACEMENTS}")
        if self.dtypes is not None:
            object.__setattr__(self, "dtypes", frozenset(_dtype_name(d) for d in self.dtypes))
        if self.ops is not None:
            object.__setattr__(self, "ops", frozenset(str(o) for o in self.ops))

    def compile(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., torch.Tensor]:
        """A callable computing what ``gm`` (a region's ATen nodes, one input per placeholder,
        one tensor out) computes, on tensors like ``example_inputs``."""
        raise NotImplementedError

    def check(self, fx_nodes: list[torch.fx.Node], region: Region) -> list["Violation"]:
        """Every constraint ``region`` (canonical indices into ``fx_nodes``) breaks on this adapter."""
        return check(self, fx_nodes, region)


@dataclass(frozen=True, eq=False)
class MockAdapter(AcceleratorAdapter):
    """An adapter that runs regions on the CPU as their ATen nodes, with configurable limits:
    ``stats`` counts ``compiles`` and ``calls``; with ``record`` the compiled modules are kept."""

    name: str = "mock"
    record: bool = True
    stats: Counter = field(default_factory=Counter)
    modules: list = field(default_factory=list)

    def compile(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., torch.Tensor]:
        self.stats["compiles"] += 1
        if self.record:
            self.modules.append(gm)

        def run(*args: torch.Tensor) -> torch.Tensor:
            self.stats["calls"] += 1
            return gm(*args)

        return run


@dataclass(frozen=True)
class Violation:
    """One broken constraint: ``node`` (the FX name; ``index`` its canonical index, ``op`` its
    operator) of a region of rule ``rule`` cannot run on ``adapter`` because of ``kind``."""

    adapter: str
    kind: str
    node: str
    index: int
    op: str
    rule: str
    detail: str

    def to_dict(self) -> dict:
        return {"adapter": self.adapter, "kind": self.kind, "node": self.node, "index": self.index, "op": self.op,
                "rule": self.rule, "detail": self.detail}


# -- the registry ---------------------------------------------------------------------------------
_ADAPTERS: dict[str, AcceleratorAdapter] = {}


def register_adapter(adapter: AcceleratorAdapter) -> AcceleratorAdapter:
    """Consult ``adapter`` for every graph compiled from now on (after those registered before it)."""
    if not isinstance(adapter, AcceleratorAdapter):
        raise AdapterError(f"{adapter!r} is not an AcceleratorAdapter")
    if _ADAPTERS.get(adapter.name, adapter) is not adapter:
        raise AdapterError(f"another adapter is registered as {adapter.name!r}; unregister it first")
    _ADAPTERS[adapter.name] = adapter
    return adapter


def unregister_adapter(adapter: AcceleratorAdapter | str) -> None:
    """Stop consulting an adapter (by object or name); graphs compiled before keep their placement."""
    _ADAPTERS.pop(adapter if isinstance(adapter, str) else adapter.name, None)


def adapters() -> tuple[AcceleratorAdapter, ...]:
    """The registered adapters, in the order they are consulted."""
    return tuple(_ADAPTERS.values())


# -- checking -------------------------------------------------------------------------------------
def _nbytes(node: torch.fx.Node) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_in(node.meta.get("val")))


def check(adapter: AcceleratorAdapter, fx_nodes: list[torch.fx.Node], region: Region) -> list[Violation]:
    """The violations of ``region`` on ``adapter``: each member whose operator it lacks, each
    (member, dtype) it does not take among the member's inputs and outputs, and the member at
    which the region's bytes (inputs, then every member's result) pass its memory limit."""
    found: list[Violation] = []

    def violation(kind: str, i: int, detail: str) -> Violation:
        return Violation(adapter.name, kind, fx_nodes[i].name, i, op_name(fx_nodes[i]), region.rule, detail)

    for i in sorted(region.nodes):
        node, op = fx_nodes[i], op_name(fx_nodes[i])
        if adapter.ops is not None and op not in adapter.ops:
            found.append(violation("op", i, f"{op} is not among the adapter's operators"))
        if adapter.dtypes is not None:
            seen = [t.dtype for a in node.all_input_nodes for t in tensors_in(a.meta.get("val"))]
            seen += [t.dtype for t in tensors_in(node.meta.get("val"))]
            for dtype in sorted({_dtype_name(d) for d in seen} - adapter.dtypes):
                found.append(violation("dtype", i, f"{op} has a {dtype} tensor; the adapter takes "
                                                   f"{', '.join(sorted(adapter.dtypes)) or 'none'}"))
    if adapter.memory_bytes is not None:
        held = inputs = sum(_nbytes(fx_nodes[i]) for i in region.inputs)
        culprit = None
        for i in sorted(region.nodes):
            held += _nbytes(fx_nodes[i])
            if culprit is None and held > adapter.memory_bytes:
                culprit = i
        if culprit is not None:
            found.append(violation("memory", culprit, f"the region holds {held} bytes ({inputs} in its inputs), "
                                                      f"over the adapter's {adapter.memory_bytes} bytes"))
    return found


# -- placing and running --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Compiled:
    fn: Callable[..., torch.Tensor]
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


_COMPILED: dict[int, _Compiled] = {}  # handle (a constant in the rewritten graph) -> compiled region
_HANDLES = itertools.count(1)


@torch.library.custom_op("hypatia_adapter::run", mutates_args=())
def run(inputs: list[torch.Tensor], handle: int) -> torch.Tensor:
    """A region placed on an adapter: what the adapter compiled, called on the region's inputs;
    its result is copied to their device and the layout the graph expects where it differs."""
    entry = _COMPILED[handle]
    out = entry.fn(*inputs)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != entry.shape or out.dtype != entry.dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise AdapterError(f"an adapter's region returned {got}, the graph expects {entry.shape} {entry.dtype}")
    device = inputs[0].device
    if out.device != device or tuple(out.stride()) != entry.stride:  # the graph's later views expect its layout
        out = torch.empty_strided(entry.shape, entry.stride, dtype=entry.dtype, device=device).copy_(out)
    elif any(out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for x in inputs):
        out = out.clone()  # an operator's result may not alias its inputs
    return out


@run.register_fake
def _(inputs: list[torch.Tensor], handle: int) -> torch.Tensor:
    entry = _COMPILED[handle]
    return torch.empty_strided(entry.shape, entry.stride, dtype=entry.dtype, device=inputs[0].device)


def region_module(fx_nodes: list[torch.fx.Node], region: Region) -> torch.fx.GraphModule:
    """The region's unfused ATen nodes as a module of its inputs (``in0``, ``in1``, ...)."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {fx_nodes[i]: graph.placeholder(f"in{k}") for k, i in enumerate(region.inputs)}
    for i in sorted(region.nodes):  # canonical order is a topological order
        env[fx_nodes[i]] = graph.node_copy(fx_nodes[i], lambda n: env[n])
    graph.output(env[fx_nodes[region.output]])
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def _compile(adapter: AcceleratorAdapter, fx_nodes: list[torch.fx.Node], region: Region) -> int:
    """Compile ``region`` on ``adapter``; the handle its operator calls it by."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    out = fx_nodes[region.output].meta.get("val")
    vals = [fx_nodes[i].meta.get("val") for i in region.inputs]
    if not isinstance(out, torch.Tensor) or not all(isinstance(v, torch.Tensor) for v in vals) or not vals:
        raise AdapterError("the region does not take and return plain tensors")
    with unset_fake_temporarily():
        examples = [torch.empty_strided(tuple(v.shape), v.stride(), dtype=v.dtype, device=v.device).zero_() for v in vals]
        fn = adapter.compile(region_module(fx_nodes, region), examples)
    handle = next(_HANDLES)
    _COMPILED[handle] = _Compiled(fn, tuple(int(s) for s in out.shape), tuple(int(s) for s in out.stride()), out.dtype)
    return handle


def place(fx_nodes: list[torch.fx.Node], plan: Plan, training: bool, counters: Counter,
          violations: MutableSequence[dict]) -> tuple[Plan, dict[int, int]]:
    """``plan`` with each region that fits a registered adapter placed on it, and the handle of
    each placed region by its output; violations are counted in ``counters`` and appended to
    ``violations``."""
    registered = adapters()
    if not registered or not plan.regions:
        return plan, {}
    if training:
        for adapter in registered:
            counters[f"adapter.{adapter.name}.training_skipped"] += len(plan.regions)
        return plan, {}
    regions, handles = [], {}
    for region in plan.regions:
        placed = region
        for adapter in registered:
            found = adapter.check(fx_nodes, region)
            for v in found:
                counters[f"adapter.{adapter.name}.violations.{v.kind}"] += 1
                violations.append(v.to_dict())
                log.info("region %s stays off adapter %s: %s %s (%s): %s", region.rule, adapter.name, v.kind, v.node,
                         v.op, v.detail)
            if found:
                counters[f"adapter.{adapter.name}.regions_refused"] += 1
                continue
            try:
                handles[region.output] = _compile(adapter, fx_nodes, region)
            except Exception as exc:  # noqa: BLE001 - an adapter that cannot compile leaves the region as planned
                counters[f"adapter.{adapter.name}.compile_failed"] += 1
                log.warning("adapter %s could not compile region %s: %s: %s", adapter.name, region.rule,
                            type(exc).__name__, exc)
                continue
            counters[f"adapter.{adapter.name}.regions_placed"] += 1
            placed = replace(region, placement=adapter.name)
            break
        regions.append(placed)
    return replace(plan, regions=tuple(regions)), handles


def rewrite(model: Any, fx_nodes: list[torch.fx.Node], plan: Plan, dynamo_gm: torch.fx.GraphModule,
            handles: dict[int, int]) -> torch.fx.GraphModule:
    """The rewritten graph (:func:`hypatia.client.graphs.rewrite`) with each region in
    ``handles`` replaced by its ``hypatia_adapter::run`` operator."""
    from hypatia.client import graphs as model_graphs

    graph = torch.fx.Graph()
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(model.gm.graph, val_map))
    nodes = [val_map[n] for n in fx_nodes]
    for region in (r for r in plan.regions if r.output in handles):
        members = {nodes[i] for i in region.nodes}
        for i in region.nodes:
            for user in [u for u in nodes[i].users if u not in members and i != region.output]:
                if user.target is not operator.getitem or user.users:
                    raise AdapterError(f"region {region.rule}: node {nodes[i].name} is used outside the region")
                graph.erase_node(user)  # an unread half of a tuple result goes with it
        target = nodes[region.output]
        with graph.inserting_before(target):
            call = graph.call_function(torch.ops.hypatia_adapter.run.default,
                                       ([nodes[i] for i in region.inputs], handles[region.output]))
        call.meta = dict(target.meta) | {"hypatia_rule": region.rule, "hypatia_adapter": region.placement}
        target.replace_all_uses_with(call)
        for i in sorted(region.nodes, reverse=True):
            graph.erase_node(nodes[i])
            nodes[i] = call  # no later region reads a member but the output, which is now the call
    graph.lint()
    rest = replace(plan, regions=tuple(r for r in plan.regions if r.output not in handles))
    return model_graphs.rewrite(replace(model, gm=torch.fx.GraphModule(model.gm, graph)), nodes, rest, dynamo_gm)
