"""The executables of the hypatia device's graphs in hypatiad: a stored, planned graph rebuilt
and made runnable once per plan revision, and kept for every later execute of its keys.

A graph is rebuilt from the canonical form the store holds (:mod:`hypatia.planner.rebuild`),
and its plan applied with the same code the client uses
(:func:`hypatia.planner.executable.apply_plan`). Before it first runs, what it allocates is
found on fake tensors (:mod:`hypatia.planner.footprint`): an execute whose graph would need more
than the device has free is refused before it allocates anything.

torch is imported by the first build, on a worker thread: a daemon that only plans never loads it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from typing import Any, Callable

from hypatia.canonical import CanonicalGraph, GraphFormatError
from hypatia.planner.plan import Plan, PlanFormatError, recipe_text
from hypatia.protocol import BadRequest, UnknownGraph

log = logging.getLogger("hypatia.daemon")

PlanKeys = tuple[str, str, str]
MAX_EXECUTABLES = 64


class CannotRun(BadRequest):
    """The stored graph cannot run in the daemon (see planner.rebuild)."""


class Executable:
    """A rebuilt graph with its plan applied; the plain graph runs if the planned one fails."""

    def __init__(self, plain: Callable, planned: Callable | None, inputs: list[tuple[list[int], str]],
                 graph: Any = None, footprint: Any = None):
        self.plain = plain
        self.planned = planned
        self.inputs = inputs  # (shape, dtype) the graph was traced with
        self.graph = graph  # the rebuilt graph module, unplanned (what the device's other executors compile)
        self.footprint = footprint  # what a run allocates (planner.footprint.Footprint), None if unknown
        self.plan_failures = 0

    def check_tensors(self, tensors: list[Any]) -> None:
        """:class:`BadRequest` unless ``tensors`` match the graph's inputs (the hypatia device's
        buffers, already in the daemon)."""
        if len(tensors) != len(self.inputs):
            raise BadRequest(f"the graph takes {len(self.inputs)} inputs, the request names {len(tensors)}")
        for k, (t, (shape, dtype)) in enumerate(zip(tensors, self.inputs)):
            if list(t.shape) != shape or str(t.dtype).removeprefix("torch.") != dtype:
                raise BadRequest(f"input {k} is {t.dtype}{list(t.shape)}; the graph takes {dtype}{shape}")

    def __call__(self, *inputs: Any) -> tuple[Any, bool]:
        """The graph's outputs, and whether the planned graph failed on this call (it is not
        tried again)."""
        if self.planned is not None:
            try:
                return self.planned(*inputs), False
            except Exception as exc:  # noqa: BLE001 - as in the client: a failing kernel degrades to ATen
                log.warning("a planned graph failed in the daemon (%s: %s); it runs unplanned from now on",
                            type(exc).__name__, exc)
                self.planned = None
                self.plan_failures += 1
                return self.plain(*inputs), True
        return self.plain(*inputs), False

    def forward(self, *inputs: Any) -> Any:
        """The graph's outputs alone (a failed plan is counted in ``plan_failures``)."""
        return self(*inputs)[0]


class Executables:
    """The executables of one daemon, by keys and plan revision (at most :data:`MAX_EXECUTABLES`)."""

    def __init__(self, store: Any, stored: Callable[[PlanKeys], dict | None]):
        self.store = store
        self.stored = stored  # the PlanService's lookup of the plan kept for keys
        self._executables: OrderedDict[tuple[PlanKeys, str], Executable] = OrderedDict()
        self._build_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._executables)

    def executable(self, keys: PlanKeys, recipe: dict, device: Any) -> tuple[Executable, bool]:
        """The executable for ``keys`` under ``recipe`` (built once per plan revision's regions),
        and whether this call built it; ``device``: where its tensors live."""
        digest = hashlib.sha256(recipe_text({"regions": recipe.get("regions")}).encode()).hexdigest() + f"@{device}"
        with self._build_lock:
            found = self._executables.get((keys, digest))
            if found is not None:
                self._executables.move_to_end((keys, digest))
                return found, False
            executable = self._build(keys, recipe, device)
            self._executables[(keys, digest)] = executable
            while len(self._executables) > MAX_EXECUTABLES:
                self._executables.popitem(last=False)
            return executable, True

    def _build(self, keys: PlanKeys, recipe: dict, device: Any) -> Executable:
        from hypatia.kernels import UnknownKernel
        from hypatia.planner import executable, footprint, rebuild  # imports torch: see the module docstring

        job = self.store.get_job(keys)
        if job is None:
            raise UnknownGraph(f"no graph is stored for {keys[0][:24]}; send make_plan first")
        try:
            graph = CanonicalGraph.from_wire(job[0])
        except GraphFormatError as exc:
            raise UnknownGraph(f"the stored graph {keys[0][:24]} is unreadable ({exc}); send make_plan again") from None
        if graph.key != keys[0]:
            raise UnknownGraph(f"the stored graph does not hash to {keys[0][:24]}; send make_plan again")
        try:
            gm, nodes = rebuild.graph_module(graph, device)
        except rebuild.NotRebuildable as exc:
            raise CannotRun(f"graph {keys[0][:24]} cannot run in the daemon: {exc}") from None
        specs, size = rebuild.input_specs(graph), None
        try:  # what it allocates, on fake tensors: an execute past the free memory is refused before it runs
            size = footprint.footprint(gm, specs, device)
        except footprint.NotSizeable as exc:
            log.info("graph %s cannot be sized before it runs (%s); its execute reserves the outputs alone",
                     keys[0][:16], exc)
        planned = None
        try:
            plan = Plan.from_recipe(recipe)
            if plan.regions:
                planned = executable.apply_plan(gm, nodes, plan).forward
        except (PlanFormatError, executable.PlanMismatch, UnknownKernel) as exc:
            log.warning("plan for %s does not apply in the daemon (%s); running the graph unplanned", keys[0][:16], exc)
        return Executable(gm.forward, planned, specs, gm, size)
