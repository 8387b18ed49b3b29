"""Where a graph's plan comes from: hypatiad (started on demand, as sccache does), or the
planner in this process when the daemon is away, silent, of another protocol version, or cannot
plan it. A daemon that runs but does not answer is left alone for a while; one of another
version for the rest of the process. A graph past the daemon's own bounds is not planned here
either (:class:`NotPlanned`): planning it would cost this process what the daemon refused."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Callable

from hypatia.canonical import CanonicalGraph
from hypatia.client.autostart import AutostartFailed, ensure_daemon
from hypatia.client.rpc import DaemonClient, DaemonGone, DaemonUnavailable, GaveUpWaiting, VersionSkew
from hypatia.config import Config
from hypatia.planner import Plan, plan_graph
from hypatia.planner.plan import PlanFormatError
from hypatia.protocol import ErrorCode, RemoteError

log = logging.getLogger("hypatia.client")

# After a daemon that runs but does not answer, leave it alone this long before trying again.
UNRESPONSIVE_BACKOFF_S = 10.0


class NotPlanned(Exception):
    """A graph beyond the configured bounds (size, planning deadline): it runs unrewritten."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class DaemonPlans:
    """One process's conversation with hypatiad about plans, and its reports to it."""

    def __init__(self, config: Config, client: DaemonClient, counters: Counter, note_once: Callable[[str, str], None]):
        self.config = config
        self.client = client
        self.counters = counters
        self.note_once = note_once
        self._skip_until = 0.0

    @property
    def available(self) -> bool:
        """False while the daemon is being left alone (silent lately, or of another version)."""
        return time.monotonic() >= self._skip_until

    def tell(self, body: dict, timeout_ms: int) -> dict | None:
        """A best-effort report; None when the daemon is not there to hear it."""
        if time.monotonic() < self._skip_until:
            return None
        try:
            return self.client.call("report", body, timeout_ms=timeout_ms)
        except Exception as exc:  # noqa: BLE001 - what is not reported is measured again elsewhere
            log.debug("could not report to the daemon: %s", exc)
            return None

    def _ask(self, graph: CanonicalGraph, keys: tuple[str, str, str], workload: list, env: dict,
                    model: str) -> dict:
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
        body |= {"graph": graph.to_wire(), "workload": workload, "environment": env} | ({"model": model} if model else {})
        # EXPLORE measures every candidate before answering: seconds, not milliseconds
        timeout_ms = self.config.tune_timeout_s * 1000 if policy == "EXPLORE" else None
        try:  # a plan the daemon says it is making is waited for (HYPATIA_PLAN_WAIT_S), load or not
            recipe = self.client.call("make_plan", body, timeout_ms=timeout_ms, wait_s=self.config.plan_wait_s)["plan"]
        except GaveUpWaiting:
            self.counters["daemon_plan_gave_up"] += 1
            self.tell({"gave_up": 1, "pid": os.getpid()}, 500)
            raise
        if self.client.acknowledged:
            self.counters["daemon_plan_waits"] += 1
        return recipe

    def plan(self, graph: CanonicalGraph, keys: tuple[str, str, str], workload: list, env: dict,
             model: str = "") -> tuple[Plan, bool]:
        """The plan for these keys and whether the daemon gave it (else it was planned here);
        ``model`` labels the graph in the daemon's store."""
        if time.monotonic() >= self._skip_until:
            try:
                plan = Plan.from_recipe(self._ask(graph, keys, workload, env, model))
                if plan.graph_key != graph.key:
                    raise RemoteError(0, "the daemon served a plan for another graph")
                return plan, True
            except DaemonUnavailable as exc:
                if not isinstance(exc, DaemonGone):  # alive but silent: leave it alone a while
                    self._skip_until = time.monotonic() + UNRESPONSIVE_BACKOFF_S
                self.note_once("unavailable", f"hypatiad unavailable ({exc}); planning in-process")
            except VersionSkew as exc:
                self.counters["version_skew"] += 1
                self._skip_until = float("inf")
                self.note_once("skew", f"{exc}; planning in-process for the rest of this process")
            except RemoteError as exc:
                if exc.code in (ErrorCode.TOO_LARGE, ErrorCode.DEADLINE_EXCEEDED):
                    # the daemon's bounds: planning it here would cost this process what it refused
                    raise NotPlanned(exc.code.name, f"hypatiad: {exc.remote_message}") from None
                self.counters["daemon_errors"] += 1
                self.note_once("error", f"hypatiad could not plan a graph ({exc}); planning it in-process")
            except PlanFormatError as exc:  # this graph only: the next asks again
                self.counters["daemon_errors"] += 1
                self.note_once("error", f"hypatiad could not plan a graph ({exc}); planning it in-process")
        self.counters["local_plans"] += 1
        return plan_graph(graph, env=env), False
