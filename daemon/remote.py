"""Remote mode in hypatiad: run a stored, planned graph on a client's tensors in shared memory.

The server thread checks a ``run`` request (its keys, and every descriptor against the segment
it names) and hands it to a worker. The worker rebuilds the graph from the canonical form the
store holds (:mod:`hypatia.planner.rebuild`), applies the plan with the same code the client
uses (:func:`hypatia.planner.executable.apply_plan`), keeps that executable per keys and plan,
copies the inputs out of their segments, runs on the CPU, and writes each output into a new
segment named for this daemon and the requesting client. Segments are the client's to unlink
(see :mod:`hypatia.shm`); the daemon unlinks only outputs that nobody will read (its run failed,
or the client gave up or died meanwhile) and, every :data:`SWEEP_EVERY_S`, sweeps the segments
named for it of clients that no longer exist (never those of another daemon of the user).

torch is imported by the first run, on a worker thread: a daemon that only plans never loads it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from hypatia import limits, shm
from hypatia.canonical import CanonicalGraph, GraphFormatError
from hypatia.daemon.failures import FailureLog
from hypatia.planner.plan import Plan, PlanFormatError, recipe_text
from hypatia.protocol import BadRequest, ErrorCode, ProtocolError, TooLarge, UnknownGraph, require

log = logging.getLogger("hypatia.daemon")

PlanKeys = tuple[str, str, str]
SWEEP_EVERY_S = 2.0
MAX_EXECUTABLES = 64
REQUEST_TAG = re.compile(r"[0-9a-z]{8,32}")


class CannotRun(BadRequest):
    """The stored graph cannot run in the daemon (see planner.rebuild); the client runs it."""


class RunTooLarge(TooLarge):
    """The run would allocate more than ``HYPATIA_REMOTE_MAX_OUTPUT_MB``; the client runs it."""


@dataclass(frozen=True)
class RunJob:
    """A checked run request: the graph's keys and plan, the client, its input segments."""

    keys: PlanKeys
    recipe: dict
    pid: int
    tag: str
    inputs: tuple[shm.Descriptor, ...]


class Executable:
    """A rebuilt graph with its plan applied; the plain graph runs if the planned one fails."""

    def __init__(self, plain: Callable, planned: Callable | None, inputs: list[tuple[list[int], str]],
                 graph: Any = None):
        self.plain = plain
        self.planned = planned
        self.inputs = inputs  # (shape, dtype) the graph was traced with
        self.graph = graph  # the rebuilt graph module, unplanned (what the device's other executors compile)
        self.plan_failures = 0

    def check(self, descs: tuple[shm.Descriptor, ...]) -> None:
        """:class:`BadRequest` unless the tensors are as many, and of the shapes and dtypes,
        as the graph's inputs."""
        if len(descs) != len(self.inputs):
            raise BadRequest(f"the graph takes {len(self.inputs)} inputs, the request names {len(descs)}")
        for k, (d, (shape, dtype)) in enumerate(zip(descs, self.inputs)):
            if list(d.shape) != shape or d.dtype != dtype:
                raise BadRequest(f"input {k} is {d.dtype}{list(d.shape)}; the graph takes {dtype}{shape}")

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


def _outcome(code: ErrorCode, message: str) -> dict:
    return {"ok": False, "code": int(code), "message": message}


class RunService:
    """Run requests and the shared-memory bookkeeping of one daemon; ``counters`` are updated
    on the server thread only (:meth:`finished`, :meth:`tick`)."""

    def __init__(self, store: Any, stored: Callable[[PlanKeys], dict | None], daemon: str,
                 failures: FailureLog, max_output_bytes: int = 1 << 30):
        self.store = store
        self.failures = failures
        self.daemon = daemon  # the id in the names of this daemon's segments (shm.daemon_id)
        self.stored = stored  # the PlanService's lookup of the plan kept for keys
        self.max_output_bytes = max_output_bytes  # HYPATIA_REMOTE_MAX_OUTPUT_MB
        self.counters: Counter = Counter()
        self._executables: OrderedDict[tuple[PlanKeys, str], Executable] = OrderedDict()
        self._build_lock = threading.Lock()
        self._next_sweep = 0.0

    # -- server thread ---------------------------------------------------------------------
    def parse(self, body: dict, request_id: int) -> RunJob:
        """Check a run body and its segments; :class:`BadRequest` or :class:`UnknownGraph`."""
        keys = tuple(limits.text(body, field, limits.MAX_KEY_CHARS, request_id, required=True)
                     for field in ("graph_key", "workload_key", "env_key"))
        pid = require(body, "pid", int, request_id)
        tag = require(body, "tag", str, request_id)
        if not 0 < pid < 2**31:
            raise BadRequest(f"pid {pid} is not a process id", request_id)
        if not REQUEST_TAG.fullmatch(tag):
            raise BadRequest("tag must be 8 to 32 characters of [0-9a-z]", request_id)
        try:
            inputs = shm.parse_all(require(body, "inputs", list, request_id), pid, tag + "i", self.daemon)
            if any(d is None for d in inputs):
                raise shm.BadDescriptor("every input of a run must be a tensor descriptor")
            for d in inputs:
                shm.check(d)
        except shm.BadDescriptor as exc:
            raise BadRequest(f"inputs: {exc}", request_id) from None
        recipe = self.stored(keys)
        if recipe is None:
            raise UnknownGraph(f"no plan is stored for graph {keys[0][:24]}; send make_plan first", request_id)
        return RunJob(keys, recipe, pid, tag, tuple(inputs))

    def finished(self, outcome: dict) -> None:
        """Count what a worker's run did."""
        c = self.counters
        for key in ("segments_read", "bytes_read", "segments_written", "bytes_written"):
            c[key] += outcome.get(key, 0)
        c["runs" if outcome.get("ok") else "abandoned" if outcome.get("abandoned") else "run_errors"] += 1
        c["executables_built"] += outcome.get("built", 0)
        c["plan_failures"] += outcome.get("plan_failed", 0)

    def tick(self, now: float) -> None:
        """Sweep the segments of dead clients, at most every :data:`SWEEP_EVERY_S`."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY_S
        try:
            removed = shm.sweep(self.daemon)
        except OSError as exc:  # /dev/shm unreadable: nothing to sweep, say so once in a while
            log.warning("shared-memory sweep failed: %s", exc)
            return
        if removed:
            log.info("swept %d shared-memory segment(s) of clients that exited: %s", len(removed), ", ".join(removed[:8]))
        self.counters["segments_swept"] += len(removed)

    def stats(self) -> dict:
        c = self.counters
        return {
            "remote": {"runs": c["runs"], "errors": c["run_errors"], "abandoned": c["abandoned"],
                       "executables_built": c["executables_built"], "executables_cached": len(self._executables),
                       "plan_failures": c["plan_failures"]},
            "shm": {"transfers": c["segments_read"] + c["segments_written"],
                    "bytes": c["bytes_read"] + c["bytes_written"],
                    "segments_read": c["segments_read"], "segments_written": c["segments_written"],
                    "segments_swept": c["segments_swept"]},
        }

    # -- worker thread ---------------------------------------------------------------------
    def run(self, job: RunJob) -> dict:
        """Run ``job``; the outcome, never an exception. Output segments exist only in an ok
        outcome, whose ``outputs`` the server sends to the client."""
        import torch  # the first run pays for it, not the daemon's start

        from hypatia.planner.footprint import written_bytes

        outcome: dict[str, Any] = {"segments_read": 0, "bytes_read": 0, "segments_written": 0, "bytes_written": 0}
        written: list[str] = []
        try:
            executable, built = self.executable(job.keys, job.recipe)
            outcome["built"] = int(built)
            executable.check(job.inputs)
            inputs = []
            for d in job.inputs:
                inputs.append(shm.read(d))
                outcome["segments_read"] += d.name is not None
                outcome["bytes_read"] += d.nbytes
            with torch.inference_mode():
                result, plan_failed = executable(*inputs)
            outcome["plan_failed"] = int(plan_failed)
            del inputs
            results = result if isinstance(result, (tuple, list)) else (result,)
            self._bound("the outputs", sum(written_bytes(v) for v in results if isinstance(v, torch.Tensor)))
            outputs = []
            for k, value in enumerate(results):
                if isinstance(value, torch.Tensor):
                    desc = shm.put(value, shm.segment_name(self.daemon, job.pid, f"{job.tag}o{k}"))
                    if desc.name is not None:
                        written.append(desc.name)
                        outcome["segments_written"] += 1
                        outcome["bytes_written"] += desc.nbytes
                    outputs.append(desc.to_wire())
                elif value is None or isinstance(value, (bool, int, float)):
                    outputs.append({"value": value})
                else:
                    raise shm.NotShareable(f"output {k} is a {type(value).__name__}")
            if not shm.pid_alive(job.pid) or not all(shm.exists(d.name) for d in job.inputs if d.name):
                # the client died or gave up (it unlinks its inputs when it does): nobody will read these
                for name in written:
                    shm.unlink(name)
                return outcome | {"ok": False, "abandoned": True}
            return outcome | {"ok": True, "outputs": outputs}
        except Exception as exc:  # noqa: BLE001 - every failure is an error reply, never a dead worker
            for name in written:
                shm.unlink(name)
            if isinstance(exc, ProtocolError):
                return outcome | _outcome(exc.code, str(exc))
            if isinstance(exc, shm.NotShareable):
                return outcome | _outcome(ErrorCode.INTERNAL, str(exc))
            self.failures.failed("run", type(exc).__name__, f"graph {job.keys[0][:16]}: {exc}", logging.ERROR, exc)
            return outcome | _outcome(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def executable(self, keys: PlanKeys, recipe: dict, device: Any = None) -> tuple[Executable, bool]:
        """The executable for ``keys`` under ``recipe`` (built once per plan revision's regions),
        and whether this call built it; ``device``: for the hypatia device's buffers there."""
        digest = hashlib.sha256(recipe_text({"regions": recipe.get("regions")}).encode()).hexdigest()
        digest += "" if device is None else f"@{device}"
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

    def _build(self, keys: PlanKeys, recipe: dict, device: Any = None) -> Executable:
        from hypatia.kernels import UnknownKernel
        from hypatia.planner import executable, footprint, rebuild  # import torch: see run()

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
        if device is None:  # remote mode's bound; the hypatia device has its pool's limit instead
            try:  # what it allocates, on fake tensors: a graph past the limit is refused before it runs
                size = footprint.footprint(gm, rebuild.input_specs(graph))
            except footprint.NotSizeable as exc:
                raise CannotRun(f"graph {keys[0][:24]} cannot run in the daemon: {exc}") from None
            self._bound("the outputs", size.outputs, graph=keys[0])
            self._bound(f"the tensors alive at {size.peak_at}", size.peak, graph=keys[0])
        planned = None
        try:
            plan = Plan.from_recipe(recipe)
            if plan.regions:
                planned = executable.apply_plan(gm, nodes, plan).forward
        except (PlanFormatError, executable.PlanMismatch, UnknownKernel) as exc:
            log.warning("plan for %s does not apply in the daemon (%s); running the graph unplanned", keys[0][:16], exc)
        return Executable(gm.forward, planned, rebuild.input_specs(graph), gm)

    def _bound(self, what: str, nbytes: int, graph: str | None = None) -> None:
        """:class:`RunTooLarge` when ``nbytes`` of ``what`` pass HYPATIA_REMOTE_MAX_OUTPUT_MB."""
        if nbytes > self.max_output_bytes:
            whose = f" of graph {graph[:24]}" if graph else ""
            raise RunTooLarge(f"{what}{whose} would take {_mib(nbytes)} in the daemon, above its "
                              f"HYPATIA_REMOTE_MAX_OUTPUT_MB={self.max_output_bytes >> 20}; the client runs it itself")


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB" if nbytes < 1 << 40 else f"{nbytes / (1 << 40):.1f} TiB"
