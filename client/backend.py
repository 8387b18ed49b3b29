"""``torch.compile(model, backend="hypatia")``: trace, key, plan, rewrite, choose an executor, run.

For every graph Dynamo hands over:

1. trace it to the *model graph*, functional ATen operators (:mod:`hypatia.client.graphs`);
2. canonicalize and key it, and get its plan from the daemon (planned in-process when no daemon
   answers);
3. rewrite the planned regions into the operators their kernels place;
4. run it under the executor measured fastest for it, which the daemon keeps with the plan;
   where nothing is measured yet, the default executor runs at once and the others are built and
   timed on the model's own calls (:mod:`hypatia.client.choice`), and the choice goes to the
   daemon for every later process.

Any Hypatia error makes that graph run as eager PyTorch (Dynamo's own graph), with one warning and
a counted fallback: a model never fails because of Hypatia.
"""

from __future__ import annotations

import atexit
import functools
import logging
import sys
import os
import threading
from collections import Counter, deque
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx

from hypatia.canonical import CanonicalGraph
from hypatia.client import adapters as accel, capture as cap
from hypatia.client import compiled as code, executors, graphs as model_graphs, validate
from hypatia.client.explain import debug_fx_plan, fusion_summary
from hypatia.client.torch_internals import compiled_model_name, dynamo_tracing_context
from hypatia.client.userwarn import warn
from hypatia.client.choice import ExecutorChoice, Measured
from hypatia.client.planning import DaemonPlans, NotPlanned
from hypatia.client.remote import RemoteRunner
from hypatia.client.rpc import DaemonClient
from hypatia.config import Config, load
from hypatia.debug.trail import Trail
from hypatia.kernels import transparent
from hypatia.planner import Plan
from hypatia.planner import environment
from hypatia.planner.plan import Region, region_key

log = logging.getLogger("hypatia.client")


class HypatiaFallbackWarning(RuntimeWarning):
    """A graph runs as eager PyTorch because Hypatia could not plan or run it."""


class Guarded:
    """Runs ``compiled``; on any error from it, warns once, counts, and runs ``eager`` from then on."""

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any], on_failure: Callable[[BaseException], None]):
        self.compiled = compiled
        self.eager = eager
        self.on_failure = on_failure
        self.failed = False
        self.failed_args: tuple = ()  # the call that failed (the minifier's inputs)

    def __call__(self, *args: Any) -> Any:
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any executor failure degrades to eager
                self.failed = True
                self.failed_args = args
                self.on_failure(exc)
        return self.eager(*args)


class Session:
    """Per-process state: configuration, the daemon connection, counters and warned reasons."""

    def __init__(self, config: Config | None = None):
        self.config = config or load()
        if os.environ.get("HYPATIA_LOG_LEVEL"):
            logger = logging.getLogger("hypatia")
            logger.setLevel(getattr(logging, self.config.log_level, logging.INFO))
            if not logger.handlers:
                logger.addHandler(logging.StreamHandler())
        self.client = DaemonClient(self.config)
        self.counters: Counter = Counter()
        self.remote = RemoteRunner(self.config, self.counters) if self.config.mode == "remote" else None
        self.sharing = code.CodeSharing(self.config, self.client, self.counters, self._note_once) \
            if self.config.share_compiled else None
        self.plans: deque[tuple[str, Plan]] = deque(maxlen=256)  # (phase, plan) of recent compiles
        self.plan_keys: deque[tuple[str, str, str]] = deque(maxlen=256)  # their (graph, workload, env) keys
        self.choices: deque[dict] = deque(maxlen=256)  # measured executor choices (us)
        self.violations: deque[dict] = deque(maxlen=1024)  # accelerator adapters' constraint violations (Violation.to_dict)
        # Which of a plan's regions are rewritten, by (index in the plan, region); None: all. The
        # others run unfused. Set by debugging tools (KernelDiff's attribution), not by users.
        self.region_filter: Callable[[int, Region], bool] | None = None
        self._warned: set[str] = set()
        self.daemon = DaemonPlans(self.config, self.client, self.counters, self._note_once)
        self._lock = threading.Lock()
        self.artifacts = None  # HYPATIA_ARTIFACTS: this process's artifacts folder
        if self.config.artifacts:
            try:
                from hypatia.debug.recorder import recorder_for

                self.artifacts = recorder_for(self.config.artifacts, self._artifact_error)
            except Exception as exc:  # noqa: BLE001 - a debug aid never fails the user's model
                self._artifact_error("the artifacts folder", exc)
        if self.config.summary:
            atexit.register(self.print_summary)

    def summary(self) -> str:
        """What this process's compiles fused, in one line (see :func:`summary`)."""
        return fusion_summary(list(zip(self.plan_keys, (plan for _, plan in self.plans))))

    def print_summary(self) -> None:
        """``HYPATIA_SUMMARY=1``: the one-line summary on stderr as the process exits."""
        graphs = len(set(self.plan_keys))
        print(f"hypatia: {graphs} graph{'s' if graphs != 1 else ''} planned; fused {self.summary()}", file=sys.stderr)

    # -- failures -------------------------------------------------------------------------
    def fallback(self, what: str, exc: BaseException) -> None:
        """Count a graph that runs eager; warn once per kind of failure; tell the daemon."""
        self.counters["fallbacks"] += 1
        reason = f"{what}: {type(exc).__name__}: {exc}"
        kind = type(exc).__name__
        log.debug("fallback to eager: %s", reason, exc_info=exc)
        if kind not in self._warned:
            self._warned.add(kind)
            warn(f"Hypatia runs this graph as eager PyTorch ({reason}). Set HYPATIA_LOG_LEVEL=DEBUG "
                 "for details; `hypatia-ctl stats` counts fallbacks.", HypatiaFallbackWarning)
        self.daemon.tell({"fallbacks": 1, "reason": reason[:500], "pid": os.getpid()}, 500)

    # -- planning -------------------------------------------------------------------------
    def plan(self, graph: CanonicalGraph, keys: tuple[str, str, str], workload: list, env: dict,
             model: str = "") -> tuple[Plan, bool]:
        """The plan for these keys and whether the daemon gave it (see :class:`DaemonPlans`)."""
        return self.daemon.plan(graph, keys, workload, env, model)

    def _not_planned(self, exc: NotPlanned) -> None:
        """Count a graph left unplanned; say why once per kind of reason."""
        self.counters["graphs_not_planned"] += 1
        self._note_once(f"not-planned:{exc.kind}", f"a graph runs unrewritten: {exc}")

    def _note_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("%s", message)

    # -- compiling ------------------------------------------------------------------------
    def compile(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        """What runs Dynamo's ``gm``: its rewritten graph under the chosen executor, or ``gm``
        itself when anything goes wrong."""
        trail = Trail(gm, example_inputs, "training" if model_graphs.is_training(example_inputs) else "inference")
        try:
            with self._lock:
                compiled = self._compile(gm, example_inputs, trail)
        except Exception as exc:  # noqa: BLE001 - never fail the user's model
            self.fallback("the graph could not be compiled", exc)
            trail.fallbacks.append(f"the graph could not be compiled: {type(exc).__name__}: {exc}")
            trail.executor = "eager"
            self._record(trail)
            return gm.forward
        folder = self._record(trail)
        if compiled == gm.forward:
            # the eager executor: nothing to guard, and Dynamo calls its own graph's forward
            # with less overhead than any other callable (measured: about 20 us a call)
            return gm.forward
        number = _folder_number(folder) or self._graph_number()

        def failed(exc: BaseException) -> None:
            self._failed_at_run_time(exc, folder)
            if self.config.artifacts:
                self._repro("executor_repro", number, gm, list(guarded.failed_args), exc)
            guarded.failed_args = ()  # the call's tensors are not kept past the repro

        guarded = Guarded(compiled, gm.forward, failed)
        return guarded

    def _graph_number(self) -> int:
        """The number of the graph compiled last (1, 2, ... in this process)."""
        return self.counters["graphs_inference"] + self.counters["graphs_training"]

    def _repro(self, trigger: str, *args: Any) -> None:
        """``HYPATIA_ARTIFACTS``: write a minified repro with ``hypatia.debug.triggers.<trigger>``;
        a problem of the minifier's is logged once and never reaches the model."""
        try:
            from hypatia.debug import triggers

            getattr(triggers, trigger)(self.config.artifacts, *args)
        except Exception as exc:  # noqa: BLE001 - debugging aids never break the run
            self._note_once(f"repro:{trigger}", f"could not write a repro ({type(exc).__name__}: {exc})")

    def _failed_at_run_time(self, exc: BaseException, folder: Any) -> None:
        self.fallback("the graph failed at run time", exc)
        if folder is not None and self.artifacts is not None:
            try:
                self.artifacts.note_fallback(folder, f"the graph failed at run time: {type(exc).__name__}: {exc}")
            except Exception as error:  # noqa: BLE001 - a debug aid never fails the user's model
                self._artifact_error("summary.json", error)

    def _record(self, trail: Trail) -> Any:
        """HYPATIA_ARTIFACTS: write the graph's folder and return it (None when off or not
        written; errors counted, never raised)."""
        if self.artifacts is None:
            return None
        try:
            from hypatia.client.torch_internals import current_compile_id

            trail.compile_id = current_compile_id()
            return self.artifacts.record(trail)
        except Exception as exc:  # noqa: BLE001 - a debug aid never fails the user's model
            self._artifact_error("graph folder", exc)
            return None

    def _artifact_error(self, what: str, exc: BaseException) -> None:
        self.counters["artifacts_write_errors"] += 1
        log.debug("could not write %s to the artifacts folder", what, exc_info=exc)
        self._note_once("artifacts", f"could not write {what} to HYPATIA_ARTIFACTS={self.config.artifacts} "
                        f"({type(exc).__name__}: {exc}); the model runs on, and each such error is counted as "
                        "artifacts_write_errors")

    def _compile(self, gm: torch.fx.GraphModule, example_inputs: list[Any], trail: Trail) -> Callable[..., Any]:
        training = model_graphs.is_training(example_inputs)
        phase = "training" if training else "inference"
        self.counters[f"graphs_{phase}"] += 1
        device = next((x.device.type for x in example_inputs if isinstance(x, torch.Tensor)), "cpu")
        index = next((x.device.index or 0 for x in example_inputs
                      if isinstance(x, torch.Tensor) and x.device.type == device), 0)
        graphs = executors.Graphs(gm, list(example_inputs), device, training, tracing=dynamo_tracing_context())
        # code that calls this process's adapters, or compiled from a filtered region set, is
        # neither served nor shared: it is compiled here
        shareable = self.sharing is not None and self.region_filter is None and not accel.adapters()
        source = self.sharing.source(gm, example_inputs, phase) if shareable else None
        if source is not None and self.remote is None and self.daemon.available:
            warm = self.sharing.warm_start(graphs, source, index)
            if warm is not None:
                compiled, warm_plan, warm_keys = warm
                trail.warm_start, trail.from_daemon, trail.planned, trail.plan, trail.keys = True, True, warm_plan, warm_plan, warm_keys
                self.plans.append((phase, warm_plan))
                self.plan_keys.append(warm_keys)
                return compiled
        plan, keys, model = None, None, None
        try:
            model = model_graphs.trace(gm, example_inputs)
        except model_graphs.NotRewritable as exc:
            self.counters["graphs_not_rewritten"] += 1
            trail.fallbacks.append(f"not rewritten: {exc}")
            self._note_once(f"not-rewritten:{str(exc)[:40]}", f"a graph runs unrewritten: {exc}")
        if model is not None and len(model.gm.graph.nodes) > self.config.max_graph_nodes:
            self._not_planned(NotPlanned("TOO_LARGE", (
                f"it has {len(model.gm.graph.nodes)} nodes, over HYPATIA_MAX_GRAPH_NODES={self.config.max_graph_nodes} "
                "(raise the limit to plan graphs this large)")))
            trail.fallbacks.append(f"not planned: {len(model.gm.graph.nodes)} nodes, over HYPATIA_MAX_GRAPH_NODES")
            model = None
        if model is not None:
            graph, fx_nodes = cap.capture(model.gm)
            wkey, workload = cap.graph_workload_key(example_inputs, phase)
            ekey, env = environment.describe(cap.graph_device(graph), index)
            keys = (graph.key, wkey, ekey)
            label = compiled_model_name()
            trail.model, trail.fx_nodes, trail.graph, trail.env, trail.keys, trail.label = model, fx_nodes, graph, env, keys, label
            try:
                plan, from_daemon = self.plan(graph, keys, workload, env, label)
            except NotPlanned as exc:
                self._not_planned(exc)
                trail.fallbacks.append(f"not planned: {exc}")
                return self._executor(graphs, None, None, None, trail)
            trail.planned, trail.from_daemon = plan, from_daemon
            plan = self._validate(graph, fx_nodes, plan, keys, from_daemon, trail)
            handles: dict[int, int] = {}
            if accel.adapters():
                found: list[dict] = []
                plan, handles = accel.place(fx_nodes, plan, model.training, self.counters, found)
                self.violations.extend(found)
                trail.violations = found
            trail.plan = plan
            self.plans.append((phase, plan))
            self.plan_keys.append(keys)
            if self.config.debug_fx:
                log.warning("HYPATIA_DEBUG_FX %s", debug_fx_plan(plan, phase, label, from_daemon))
                log.warning("HYPATIA_DEBUG_FX %s graph %s before:\n%s", phase, keys[0], model.gm.graph)
            rewritten = self._filtered(plan)
            if rewritten.regions:
                self.counters["regions_fused"] += len(rewritten.regions)
                graphs.rewritten, graphs.for_inductor = self._rewrites(model, fx_nodes, rewritten, gm, handles)
                if self.config.debug_fx:
                    log.warning("HYPATIA_DEBUG_FX %s graph after:\n%s", phase, graphs.rewritten().graph)
            if source is not None and from_daemon:  # a daemon that answered is there to share with
                graphs.share = self.sharing.sharer(keys, index, plan, source)
                if index:
                    self._note_once("compiled-index", f"compiled code is shared per device index (Inductor's code "
                                    f"names cuda:{index}); ranks that each see their GPU as cuda:0 (torchrun "
                                    "--virtual-local-rank) share one compile for the host")
        # measurements of a filtered graph are not this plan's: they stay out of the daemon
        local = self._executor(graphs, model, plan, keys if self.region_filter is None else None, trail)
        trail.rewritten, trail.for_inductor = graphs.rewritten, graphs.for_inductor
        if self.remote is None or model is None or self.region_filter is not None:
            return local
        output_type = type(next(n for n in gm.graph.nodes if n.op == "output").args[0])
        boxed_local = lambda args: local(*args)  # noqa: E731 - remote mode's calls are boxed
        remote = self.remote.wrap(model.gm, gm, phase, example_inputs, output_type, boxed_local)
        return local if remote is boxed_local else (lambda *args: remote(list(args)))

    def _filtered(self, plan: Plan) -> Plan:
        """``plan`` with only the regions :attr:`region_filter` keeps (all of them when unset)."""
        if self.region_filter is None:
            return plan
        keep = self.region_filter
        return replace(plan, regions=tuple(r for i, r in enumerate(plan.regions) if keep(i, r)))

    @staticmethod
    def _rewrites(model: model_graphs.ModelGraph, fx_nodes: list, plan: Plan, gm: torch.fx.GraphModule,
                  handles: dict[int, int] | None = None):
        """Factories of fresh copies of the rewritten graph: every region, for the aten
        executor; only the regions that are ATen operators or placed on an accelerator adapter
        (``handles``, by region output), for Inductor, which fuses what the ``hypatia::``
        operators would hide from it (None: Dynamo's graph). Each rewrite is made once, when
        first asked for."""
        handles = handles or {}
        rewrite = functools.partial(accel.rewrite, handles=handles) if handles else model_graphs.rewrite

        def factory(regions_plan: Plan) -> Callable[[], torch.fx.GraphModule]:
            made = functools.cache(lambda: rewrite(model, fx_nodes, regions_plan, gm))
            return lambda: model_graphs.copy_of(made(), gm)

        full = factory(plan)
        visible = tuple(r for r in plan.regions if r.output in handles or transparent(r.kernel, r.placement))
        if len(visible) == len(plan.regions):
            return full, full
        return full, factory(replace(plan, regions=visible)) if visible else None

    def _validate(self, graph: CanonicalGraph, fx_nodes: list, plan: Plan, keys: tuple[str, str, str],
                  from_daemon: bool, trail: Trail | None = None) -> Plan:
        """Check the plan's regions under HYPATIA_CHECKSUM_MODE; failing ones run unfused.

        ``background`` leaves the check to the daemon, which validates every new region shape
        while the model runs (unless this plan was made here, with no daemon to do it)."""
        mode = self.config.checksum_mode
        if mode == "background":
            if from_daemon:
                return plan
            mode = "strict"
        by_output = {r.output: r for r in plan.regions}
        plan, verdicts = validate.validate(fx_nodes, plan, mode)
        if trail is not None:
            trail.verdicts = verdicts
        failed = [v for v in verdicts if not v.ok]
        self.counters["regions_validated"] += len(verdicts) - len(failed)
        self.counters["regions_failed_validation"] += len(failed)
        for v in failed:
            self._note_once(f"verdict:{v.rule}", f"fused region {v.rule} ({v.kernel}) failed validation and runs unfused: {v.detail}")
            if self.config.artifacts and mode == "strict":
                self._repro("region_repro", self._graph_number(), fx_nodes, by_output[v.region], v.detail)
        reportable = verdicts if mode == "strict" else failed
        if reportable and from_daemon:
            wire = [v.to_wire() | {"region_key": region_key(graph, by_output[v.region]),
                                   "implementation": by_output[v.region].implementation} for v in reportable]
            self.daemon.tell({"graph_key": keys[0], "workload_key": keys[1], "env_key": keys[2], "verdicts": wire}, 1000)
        return plan

    # -- executors ------------------------------------------------------------------------
    def _executor(self, graphs: executors.Graphs, model: model_graphs.ModelGraph | None, plan: Plan | None,
                  keys: tuple[str, str, str] | None, trail: Trail | None = None) -> Callable[..., Any]:
        """The executor ``graphs`` run under: forced by HYPATIA_EXECUTOR, the one the daemon
        keeps for this plan, or the default at once with the others measured as the model runs."""
        refusal = executors.cudagraphs.refusal(graphs.dynamo, model.gm if model is not None else None,
                                               graphs.example_inputs)
        if refusal is not None and graphs.device == "cuda":
            self.counters[f"cudagraphs_refused.{refusal}"] += 1
        names = executors.candidates(graphs, refusal)
        stored = plan.executor.chosen if plan is not None and plan.executor is not None else None
        if self.config.executor != "auto":
            name = self.config.executor
        elif stored is not None:
            name = stored
            self.counters["executor_from_daemon"] += 1
        elif self.config.policy == "HEURISTIC" or len(names) == 1:
            name = names[0]
        else:
            name = None
        if name is not None:
            name = self._runnable(name, graphs, refusal)
            self.counters[f"executor.{name}"] += 1
            if trail is not None:
                trail.executor = name
            return executors.build(name, graphs)
        if trail is not None:
            trail.executor, trail.candidates = names[0], list(names)
        first = executors.build(names[0], graphs)
        self.counters["executor_measurements"] += 1

        def build(name: str, args: list) -> Callable[..., Any]:
            return executors.build(name, graphs, args)

        def report(chosen: str, results: dict[str, Measured]) -> None:
            self.counters[f"executor.{chosen}"] += 1
            self.choices.append({n: m.to_wire(n) for n, m in results.items()} | {"chosen": chosen})
            for reason in graphs.skipped:
                self.counters["cudagraphs_skipped_by_torch"] += 1
                self._note_once(f"skipped:{reason[:40]}", f"CUDA graphs skipped a graph: {reason}")
            if keys is None or plan is None:
                return
            body = {"graph_key": keys[0], "workload_key": keys[1], "env_key": keys[2], "executor": {
                "revision": plan.revision, "chosen": chosen, "training": graphs.training,
                "times": [m.to_wire(n) for n, m in results.items()]}}
            self.daemon.tell(body, 1000)

        return ExecutorChoice(names, first, build, cuda=graphs.device == "cuda", report=report)

    def _runnable(self, name: str, graphs: executors.Graphs, refusal: str | None) -> str:
        """``name``, or the nearest candidate this graph can run: without CUDA graphs where they
        are refused, eager where nothing was rewritten for aten to run."""
        executor, captured = executors.parse(name)
        if captured and not executors.cudagraphs.allows(refusal, executor):
            self._note_once(f"refused:{refusal}", f"CUDA graphs are not used for a graph: {refusal}")
            captured = False
        if executor == "aten" and graphs.rewritten is None:
            executor = "eager"
        return executor + (executors.CUDAGRAPHS if captured else "")


def _folder_number(folder: Any) -> int | None:
    """NNN of a graph's artifacts folder (``graph-NNN-<label>``), so that its repros match it."""
    try:
        return int(Path(folder).name.split("-")[1])
    except (TypeError, ValueError, IndexError):
        return None


_session: Session | None = None
_session_lock = threading.Lock()

if os.environ.get("HYPATIA_ARTIFACTS", "").strip():
    try:  # listen to torch's trace from now on: the first frame's graph breaks come before its graph
        from hypatia.debug.recorder import recorder_for

        recorder_for(os.environ["HYPATIA_ARTIFACTS"].strip())
    except Exception as exc:  # noqa: BLE001 - the session says why when it tries again
        log.debug("artifacts folder not ready: %s", exc)


def session() -> Session:
    """This process's session (a forked child builds its own)."""
    global _session
    with _session_lock:
        if _session is None or _session.client._pid != os.getpid():
            _session = Session()
        return _session


def reset_session() -> None:
    """Forget this process's session (tests use it after changing HYPATIA_* variables)."""
    global _session
    with _session_lock:
        if _session is not None:
            _session.client.close()
            if _session.artifacts is not None:
                _session.artifacts.close()
        _session = None


def hypatia_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable[..., Any]:
    """The Dynamo backend registered as ``hypatia``."""
    device = sys.modules.get("hypatia.device.tensor")  # imported where the hypatia device is in use
    if device is not None and any(isinstance(x, device.HypatiaTensor) for x in example_inputs):
        from hypatia.device.compiled import compile_graph

        return compile_graph(gm, example_inputs)  # a model on the device: its graphs run in hypatiad
    try:
        s = session()
    except Exception as exc:  # noqa: BLE001 - e.g. a bad HYPATIA_* variable
        warn(f"Hypatia is disabled for this process: {exc}", HypatiaFallbackWarning)
        return gm.forward
    return s.compile(gm, example_inputs)


def summary() -> str:
    """What this process compiled with Hypatia fused, in one line: each rule with its count,
    most frequent first (``rms_norm x2, attention_fill_mask, linear_silu``), or ``nothing fused``."""
    with _session_lock:
        current = _session if _session is not None and _session.client._pid == os.getpid() else None
    return current.summary() if current is not None else fusion_summary([])
