"""``torch.compile(model, backend="hypatia")``: capture, key, ask the daemon, build, run.

Every graph Dynamo hands over goes through AOTAutograd; its forward, backward and inference
graphs are each canonicalized and keyed, planned by the daemon (or, when none answers, by the
same planner in-process) and rebuilt with fused kernel calls. Any Hypatia error makes that
graph run as eager PyTorch, with one warning and a counted fallback: a model never fails
because of Hypatia.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
import warnings
from collections import Counter, deque
from typing import Any, Callable

import torch
import torch.fx

from hypatia.canonical import CanonicalGraph
from hypatia.client import capture as cap
from hypatia.client import validate
from hypatia.client.autostart import AutostartFailed, ensure_daemon
from hypatia.client.choice import MeasuredChoice
from hypatia.client.executor import GuardedCall
from hypatia.client.remote import RemoteRunner
from hypatia.client.rpc import DaemonClient, DaemonGone, DaemonUnavailable, VersionSkew
from hypatia.config import Config, load
from hypatia.planner import Plan, plan_graph
from hypatia.planner import environment
from hypatia.planner.executable import apply_plan
from hypatia.planner.plan import PlanFormatError
from hypatia.protocol import RemoteError

log = logging.getLogger("hypatia.client")

# After a daemon that runs but does not answer, leave it alone this long before trying again.
UNRESPONSIVE_BACKOFF_S = 10.0


class HypatiaFallbackWarning(RuntimeWarning):
    """A graph runs as eager PyTorch because Hypatia could not plan or run it."""


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
        self.remote = RemoteRunner(self.config, self.client, self.counters) if self.config.mode == "remote" else None
        self.plans: deque[tuple[str, Plan]] = deque(maxlen=256)  # (phase, plan) of recent compiles
        self.choices: deque[dict] = deque(maxlen=256)  # measured plan-or-eager choices (us)
        self._warned: set[str] = set()
        self._skip_daemon_until = 0.0
        self._lock = threading.Lock()

    # -- failures -------------------------------------------------------------------------
    def fallback(self, what: str, exc: BaseException) -> None:
        """Count a graph that runs eager; warn once per kind of failure; tell the daemon."""
        self.counters["fallbacks"] += 1
        reason = f"{what}: {type(exc).__name__}: {exc}"
        kind = type(exc).__name__
        log.debug("fallback to eager: %s", reason, exc_info=exc)
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(
                f"Hypatia runs this graph as eager PyTorch ({reason}). Set HYPATIA_LOG_LEVEL=DEBUG "
                "for details; `hypatia-ctl stats` counts fallbacks.",
                HypatiaFallbackWarning,
                stacklevel=2,
            )
        if time.monotonic() >= self._skip_daemon_until:
            try:
                self.client.call("report", {"fallbacks": 1, "reason": reason[:500], "pid": os.getpid()}, timeout_ms=500)
            except Exception:  # noqa: BLE001 - reporting is best effort
                pass

    # -- planning -------------------------------------------------------------------------
    def _ask_daemon(self, graph: CanonicalGraph, keys: tuple[str, str, str], workload: list, env: dict) -> dict:
        if self.config.autostart and not self.config.remote:  # a remote daemon is not ours to start
            try:
                ensure_daemon(self.config)
            except AutostartFailed as exc:
                raise DaemonUnavailable(f"could not start hypatiad: {exc}") from None
        policy = self.config.policy
        body = {"graph_key": keys[0], "workload_key": keys[1], "env_key": keys[2], "policy": policy}
        recipe = self.client.call("get_plan", body)["plan"]
        if recipe is not None:
            self.counters["daemon_hits"] += 1
            return recipe
        self.counters["daemon_misses"] += 1
        body |= {"graph": graph.to_wire(), "workload": workload, "environment": env}
        # EXPLORE measures every candidate before answering: seconds, not milliseconds
        timeout_ms = self.config.tune_timeout_s * 1000 if policy == "EXPLORE" else None
        return self.client.call("make_plan", body, timeout_ms=timeout_ms)["plan"]

    def plan(self, graph: CanonicalGraph, keys: tuple[str, str, str], workload: list, env: dict) -> Plan:
        """The plan for these keys: from the daemon, or planned here when it cannot answer."""
        if time.monotonic() >= self._skip_daemon_until:
            try:
                plan = Plan.from_recipe(self._ask_daemon(graph, keys, workload, env))
                if plan.graph_key != graph.key:
                    raise RemoteError(0, "the daemon served a plan for another graph")
                return plan
            except DaemonUnavailable as exc:
                if not isinstance(exc, DaemonGone):  # alive but silent: leave it alone a while
                    self._skip_daemon_until = time.monotonic() + UNRESPONSIVE_BACKOFF_S
                self._note_once("unavailable", f"hypatiad unavailable ({exc}); planning in-process")
            except VersionSkew as exc:
                self.counters["version_skew"] += 1
                self._skip_daemon_until = float("inf")
                self._note_once("skew", f"{exc}; planning in-process for the rest of this process")
            except (RemoteError, PlanFormatError) as exc:  # this graph only: the next asks again
                self.counters["daemon_errors"] += 1
                self._note_once("error", f"hypatiad could not plan a graph ({exc}); planning it in-process")
        self.counters["local_plans"] += 1
        return plan_graph(graph, env=env)

    def _note_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("%s", message)

    def chose(self, name: str, medians: dict) -> None:
        """A compiled graph's measured choice between its plan and the pass-through graph."""
        self.counters[f"graphs_chose_{name}"] += 1
        self.choices.append({k: round(v * 1e6, 3) for k, v in medians.items()} | {"chosen": name})

    # -- compiling ------------------------------------------------------------------------
    def compile(self, gm: torch.fx.GraphModule, example_inputs: list[Any], phase: str, planned: list | None = None) -> Callable:
        """AOTAutograd's compiler for one forward, backward or inference graph; appends to
        ``planned`` whether the graph got any fused region."""
        eager = torch._functorch.aot_autograd.make_boxed_func(gm.forward)
        result = eager
        try:
            with self._lock:
                result = self._compile(gm, example_inputs, phase, eager)
        except Exception as exc:  # noqa: BLE001 - never fail the user's model
            self.fallback(f"{phase} graph could not be planned", exc)
        if planned is not None:
            planned.append((phase, result is not eager))
        return result

    def _compile(self, gm: torch.fx.GraphModule, example_inputs: list[Any], phase: str, eager: Callable) -> Callable:
        self.counters[f"graphs_{phase}"] += 1
        graph, fx_nodes = cap.capture(gm)
        wkey, workload = cap.graph_workload_key(example_inputs)
        device = cap.graph_device(graph)
        index = next(
            (x.device.index or 0 for x in example_inputs if isinstance(x, torch.Tensor) and x.device.type == device), 0
        )
        ekey, env = environment.describe(device, index)
        keys = (graph.key, wkey, ekey)
        plan = self.plan(graph, keys, workload, env)
        self.plans.append((phase, plan))
        local = self._executable(gm, fx_nodes, plan, keys, phase, eager)
        if self.remote is None:
            return local
        registration = {"graph_key": keys[0], "workload_key": keys[1], "env_key": keys[2], "policy": self.config.policy,
                        "graph": graph.to_wire(), "workload": workload, "environment": env}
        output_type = type(next(n for n in gm.graph.nodes if n.op == "output").args[0])
        return self.remote.wrap(graph, keys, registration, phase, example_inputs, output_type, local)

    def _executable(self, gm: torch.fx.GraphModule, fx_nodes: list, plan: Plan, keys: tuple[str, str, str], phase: str,
                    eager: Callable) -> Callable:
        """The graph as this process runs it: planned and validated, or eager when nothing fuses."""
        if self.config.debug_fx:
            log.warning("HYPATIA_DEBUG_FX %s graph %s before:\n%s", phase, keys[0], gm.graph)
            log.warning("HYPATIA_DEBUG_FX plan: %s", plan.to_recipe())
        if not plan.regions:
            return eager
        plan = self._validate(fx_nodes, plan, keys)
        if not plan.regions:
            return eager
        planned = apply_plan(gm, fx_nodes, plan)
        self.counters["regions_fused"] += len(plan.regions)
        if self.config.debug_fx:
            log.warning("HYPATIA_DEBUG_FX %s graph after:\n%s", phase, planned.graph)
        return GuardedCall(planned.forward, gm.forward, functools.partial(self.fallback, f"{phase} graph failed at run time"))

    def _validate(self, fx_nodes: list, plan: Plan, keys: tuple[str, str, str]) -> Plan:
        """Check the plan's regions under HYPATIA_CHECKSUM_MODE; failing ones run unfused."""
        mode = self.config.checksum_mode
        plan, verdicts = validate.validate(fx_nodes, plan, mode)
        failed = [v for v in verdicts if not v.ok]
        self.counters["regions_validated"] += len(verdicts) - len(failed)
        self.counters["regions_failed_validation"] += len(failed)
        for v in failed:
            self._note_once(f"verdict:{v.rule}", f"fused region {v.rule} ({v.kernel}) failed validation and runs unfused: {v.detail}")
        reportable = verdicts if mode == "strict" else failed
        if reportable and time.monotonic() >= self._skip_daemon_until:
            body = {"graph_key": keys[0], "workload_key": keys[1], "env_key": keys[2], "verdicts": [v.to_wire() for v in reportable]}
            try:
                self.client.call("report", body, timeout_ms=1000)
            except Exception as exc:  # noqa: BLE001 - the verdict is re-derived by the next process
                log.debug("could not report verdicts: %s", exc)
        return plan


_session: Session | None = None
_session_lock = threading.Lock()


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
        _session = None


def _backward_planned_now():
    """AOTAutograd compiles the backward graph lazily, at the first backward call; planning it
    with the forward lets the backend see both and pass a graph with nothing to fuse straight
    through. Where this torch lacks the switch, the backward is planned lazily as before."""
    import torch._functorch.config as aot_config

    if hasattr(aot_config, "force_non_lazy_backward_lowering"):
        return aot_config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


def hypatia_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable:
    """The Dynamo backend registered as ``hypatia``."""
    from torch._dynamo.backends.common import aot_autograd

    try:
        s = session()
    except Exception as exc:  # noqa: BLE001 - e.g. a bad HYPATIA_* variable
        warnings.warn(f"Hypatia is disabled for this process: {exc}", HypatiaFallbackWarning, stacklevel=2)
        return gm.forward
    planned: list[tuple[str, bool]] = []
    try:
        compiler = aot_autograd(
            fw_compiler=functools.partial(s.compile, phase="forward", planned=planned),
            bw_compiler=functools.partial(s.compile, phase="backward", planned=planned),
            inference_compiler=functools.partial(s.compile, phase="inference", planned=planned),
        )
        with _backward_planned_now():
            compiled = compiler(gm, example_inputs)
        if planned and not any(fused for _, fused in planned) and len(planned) == (1 if planned[0][0] == "inference" else 2):
            # Nothing to fuse forward or backward: Dynamo's own graph runs exactly what eager
            # would (autograd included), without AOTAutograd's runtime wrappers or per-op
            # OpOverload dispatch. Eager is the whole graph's fallback alternative.
            s.counters["graphs_passed_through"] += 1
            return gm.forward
        if s.config.policy != "HEURISTIC" and s.remote is None:
            # measured policies: the planned graph must also beat the pass-through graph whole
            device = next((x.device.type for x in example_inputs if isinstance(x, torch.Tensor)), "cpu")
            return MeasuredChoice({"plan": compiled, "eager": gm.forward}, device, s.chose)
        return compiled
    except Exception as exc:  # noqa: BLE001
        s.fallback("AOTAutograd could not trace the graph", exc)
        return gm.forward
