"""What hypatiad answers: handshake, plan lookups, planning, tuning and stats (the reports of
clients: :mod:`hypatia.daemon.reports`).

Lookups run on the server thread against an in-memory cache backed by the store. Planning runs
on worker threads and tuning on one tuner thread (measurements on one device must not overlap);
the server keeps one flight per (graph, workload, environment) for each, so that concurrent
identical requests are planned and tuned once and all get the same answer.

Policies, as a request names them (``HYPATIA_POLICY`` of the client): ``HEURISTIC`` gets the
static cost model's plan; ``FASTEST`` gets the stored plan, tuned or not, and an untuned one is
tuned in the background (unless the daemon runs with ``HYPATIA_BACKGROUND_TUNING=0``) so every
later compile gets the tuned plan; ``EXPLORE`` waits for the tuned plan.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter, OrderedDict
from typing import Any

from hypatia import __version__, limits
from hypatia.daemon.reports import PlanKeys, Reports, plan_keys
from hypatia.canonical import CanonicalGraph, GraphFormatError, environment_key, workload_key
from hypatia.config import POLICIES, Config
from hypatia.planner import counters as planner_counters
from hypatia.planner import budget, paths, verdicts as region_verdicts
from hypatia.planner.passes import candidates, finish
from hypatia.planner.plan import Plan
from hypatia.planner.store import SCHEMA_VERSION, Store, StoreError, UnreadableStore
from hypatia.protocol import PROTOCOL_VERSION, BadRequest, TooLarge, VersionMismatch, require

log = logging.getLogger("hypatia.daemon")

MAX_CACHED_PLANS = 100_000
MAX_CLIENTS_LISTED = 4096
MAX_CACHED_CEILINGS = 1024  # environments


def request_policy(body: dict, request_id: int) -> str:
    policy = body.get("policy", "FASTEST")
    if not isinstance(policy, str) or policy not in POLICIES:
        shown = repr(policy[:40]) if isinstance(policy, str) else f"of type {type(policy).__name__}"
        raise BadRequest(f"policy {shown} is not one of {', '.join(POLICIES)}", request_id)
    return policy


def serves(recipe: dict, policy: str) -> bool:
    """Whether a stored recipe answers a request under ``policy``."""
    if policy == "HEURISTIC":
        return recipe.get("policy") == "HEURISTIC"
    if policy == "EXPLORE":
        return bool(recipe.get("tuned"))
    return True


def model_label(value: Any, request_id: int) -> str:
    """The optional label of the model a graph came from: printable text, cut to a bounded size."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest("model must be a string (the class name of the compiled module)", request_id)
    return "".join(c for c in value if c.isprintable())[:limits.MAX_MODEL_LABEL_CHARS]


class GraphTooLarge(TooLarge):
    """A make_plan graph has more nodes than ``HYPATIA_MAX_GRAPH_NODES``: refused unread."""


class PlanService(Reports):
    def __init__(self, config: Config, store: Store):
        self.config = config
        self.store = store
        self.started = time.time()
        self.counters: Counter = Counter()
        self.requests: Counter = Counter()
        self.errors: Counter = Counter()
        self.clients: OrderedDict[str, dict] = OrderedDict()
        self._plans: OrderedDict[PlanKeys, dict] = OrderedDict()
        self._heuristic: OrderedDict[PlanKeys, dict] = OrderedDict()  # where the stored plan is tuned
        self._ceilings: dict[str, dict | None] = {}
        self._untunable: dict[PlanKeys, str] = store.untunable()  # plans never tuned again here

    # -- handshake ------------------------------------------------------------------------
    def hello(self, body: dict, request_id: int) -> dict:
        protocol = body.get("protocol")
        if protocol != PROTOCOL_VERSION:
            raise VersionMismatch(
                f"client speaks protocol {protocol!r}, hypatiad {__version__} speaks {PROTOCOL_VERSION}; "
                "upgrade the older side and restart the daemon",
                request_id,
            )
        # every field is kept for as long as the client is listed: each is bounded (hypatia/limits.py)
        host = limits.text(body, "host", limits.MAX_HOST_CHARS, request_id)
        pid = limits.integer(body, "pid", 0, limits.MAX_PID, request_id)
        version = limits.text(body, "version", limits.MAX_VERSION_CHARS, request_id)
        program = limits.text(body, "program", limits.MAX_PROGRAM_CHARS, request_id, default="")
        who = f"{host or '?'}:{'?' if pid is None else pid}"
        if who not in self.clients:
            self.counters["clients_seen"] += 1
        self.clients[who] = {"pid": pid, "host": host, "version": version, "program": program, "last_seen": time.time()}
        self.clients.move_to_end(who)
        while len(self.clients) > MAX_CLIENTS_LISTED:
            self.clients.popitem(last=False)
        return {"protocol": PROTOCOL_VERSION, "version": __version__, "pid": os.getpid()}

    # -- plans ----------------------------------------------------------------------------
    def stored(self, keys: PlanKeys) -> dict | None:
        """The plan stored for ``keys`` (warm cache first), whatever its policy."""
        recipe = self._plans.get(keys)
        if recipe is not None:
            self._plans.move_to_end(keys)
            return recipe
        plan = self.store.get_plan(keys)
        if plan is None:
            return None
        recipe = plan.to_recipe()
        self._remember(keys, recipe)
        return recipe

    def lookup(self, keys: PlanKeys, policy: str = "FASTEST") -> dict | None:
        """The plan that answers ``policy`` for ``keys``, or None (a miss)."""
        recipe = self.stored(keys)
        if recipe is not None and serves(recipe, policy):
            return recipe
        if policy == "HEURISTIC":
            return self._heuristic.get(keys)
        return None

    def _remember(self, keys: PlanKeys, recipe: dict) -> None:
        current = self._plans.get(keys)
        # a heuristic answer never displaces a tuned plan: it is kept apart for HEURISTIC requests
        cache = self._heuristic if current is not None and current.get("tuned") and not recipe.get("tuned") else self._plans
        cache[keys] = recipe
        while len(cache) > MAX_CACHED_PLANS:
            cache.popitem(last=False)

    def get_plan(self, body: dict, request_id: int) -> dict:
        recipe = self.lookup(plan_keys(body, request_id), request_policy(body, request_id))
        self.counters["plan_hits" if recipe is not None else "plan_misses"] += 1
        return {"plan": recipe}

    def wants_tuning(self, keys: PlanKeys, recipe: dict | None, policy: str) -> bool:
        """Whether serving ``recipe`` under ``policy`` should start a background tuning."""
        if recipe is None or recipe.get("tuned") or policy == "HEURISTIC" or not self.config.background_tuning:
            return False
        if self.untunable(keys):
            self.counters["tunings_skipped_untunable"] += 1
            return False
        return True

    def untunable(self, keys: PlanKeys) -> bool:
        """Whether tuning this plan failed before in its environment (it is not tried again)."""
        return keys in self._untunable

    def mark_untunable(self, keys: PlanKeys, reason: str) -> None:
        """Server thread: a tuning of ``keys`` failed, died, ran out of time or memory; no
        daemon on this store tunes the plan again (its heuristic plan keeps serving)."""
        self._untunable[keys] = reason
        self.counters["plans_marked_untunable"] += 1
        log.warning("plan %s is not tuned again in this environment: %s", keys[0][:16], reason)
        try:
            self.store.mark_untunable(keys, reason)
        except StoreError as exc:  # kept in memory: this daemon still never retries it
            log.error("could not record plan %s as untunable: %s", keys[0][:16], exc)

    def ceilings(self, env_key: str) -> dict | None:
        if self._ceilings.get(env_key) is None:
            if len(self._ceilings) >= MAX_CACHED_CEILINGS:  # keyed by what requests name: bounded
                self._ceilings.clear()
            self._ceilings[env_key] = self.store.ceilings(env_key)
        return self._ceilings[env_key]

    def parse_make_plan(self, body: dict, request_id: int) -> tuple[PlanKeys, dict]:
        """Validate a make_plan body on the server thread; the work itself is :meth:`make_plan`."""
        keys = plan_keys(body, request_id)
        nodes = require(body, "graph", dict, request_id).get("nodes")
        if isinstance(nodes, list) and len(nodes) > self.config.max_graph_nodes:
            self.counters["graphs_too_large"] += 1
            raise GraphTooLarge(
                f"a graph of {len(nodes)} nodes is over this daemon's limit of {self.config.max_graph_nodes} "
                "(HYPATIA_MAX_GRAPH_NODES); it is not planned and runs unrewritten. Raise HYPATIA_MAX_GRAPH_NODES "
                "for the daemon and the clients to plan graphs this large", request_id)
        try:
            graph = CanonicalGraph.from_wire(body["graph"])
        except GraphFormatError as exc:
            raise BadRequest(f"graph: {exc}", request_id) from None
        if graph.key != keys[0]:
            raise BadRequest("graph_key does not match the graph sent (client and daemon hash differently)", request_id)
        workload = limits.packed(body, "workload", list, limits.MAX_WORKLOAD_BYTES, request_id)
        if workload_key(workload)[0] != keys[1]:
            raise BadRequest("workload_key does not match the workload sent", request_id)
        env = limits.packed(body, "environment", dict, limits.MAX_ENVIRONMENT_BYTES, request_id)
        if environment_key(env)[0] != keys[2]:
            raise BadRequest("env_key does not match the environment sent", request_id)
        return keys, {"graph": graph, "wire": body["graph"], "workload": workload, "environment": env,
                      "model": model_label(body.get("model"), request_id)}

    def make_plan(self, keys: PlanKeys, job: dict, policy: str = "FASTEST") -> dict:
        """Plan one graph (worker thread) under HEURISTIC or FASTEST; returns the recipe.

        FASTEST uses the measurements already in the store when every candidate has them (the
        same regions measured for another graph or process); otherwise it is the heuristic
        plan, tuned later. A HEURISTIC plan is stored only where nothing is stored yet.
        """
        stored = self.store.get_plan(keys)
        if stored is not None and serves(stored.to_recipe(), policy):
            return stored.to_recipe()
        start = time.perf_counter()
        state = candidates(job["graph"], job["environment"], self.ceilings(keys[2]))
        measured = None
        if policy != "HEURISTIC":
            wanted = paths.wanted(job["graph"], list(state.candidates), job["environment"])
            found = self.store.traces(keys[2], list(wanted))
            if wanted and all((rkey, impl) in found for rkey, impls in wanted.items() for impl in impls):
                measured = paths.measurements(found)
                self.counters["plans_from_shared_traces"] += 1
        excluded = region_verdicts.excluded(self.store, keys[2], job["graph"], list(state.candidates),
                                            self.store.failed_regions(keys))
        plan: Plan = finish(state, "FASTEST" if measured is not None else "HEURISTIC", measured, excluded)
        plan = region_verdicts.mark_validated(self.store, keys[2], job["graph"], plan)
        if stored is None:
            implementations = [paths.implementation_row(r) for r in plan.regions]
            self.store.put_plan(keys, job["wire"], job["workload"], job["environment"], plan, implementations,
                                model=job.get("model", ""))
        elapsed = time.perf_counter() - start
        log.info(
            "planned %s (%d nodes, %d regions %s) in %.1f ms",
            keys[0][:16], len(job["graph"].nodes), len(plan.regions), plan.rules_fired, elapsed * 1e3,
        )
        return plan.to_recipe() | {"planning_ms": round(elapsed * 1e3, 3)}

    def planned(self, keys: PlanKeys, recipe: dict, tuned: bool = False) -> None:
        """Server thread: a planning (or tuning) flight landed; later lookups hit the warm cache."""
        if not tuned:
            self.counters["plans_made"] += 1
        self._remember(keys, recipe)

    # -- tuning (tuner thread) -------------------------------------------------------------
    def tune(self, keys: PlanKeys, job: dict | None, policy: str = "FASTEST") -> dict:
        """Measure and re-plan ``keys``; the tuned plan supersedes the stored one. Returns the
        tuned recipe (the stored one if it is tuned already)."""
        from hypatia.planner import tuner  # imports torch: only the tuner thread pays for it

        current = self.store.get_plan(keys)
        if current is not None and current.tuned:
            return current.to_recipe()
        if job is None:
            found = self.store.get_job(keys)
            if found is None:
                raise LookupError(f"no stored graph for plan {keys[0][:16]}")
            wire, workload, environment = found
            job = {"graph": CanonicalGraph.from_wire(wire), "wire": wire, "workload": workload, "environment": environment}
        if current is None:
            self.make_plan(keys, job, "HEURISTIC")
            current = self.store.get_plan(keys)
        report = tuner.TuneReport()
        memory = budget.budget_bytes(self.config.tune_memory_mb, str(job["environment"].get("device_type", "cpu")))
        try:
            plan = tuner.tune(job["graph"], keys, job["environment"], self.store, policy=policy,
                              budget_s=self.config.tune_budget_ms / 1000, memory_bytes=memory, report=report)
        finally:
            self.counters["regions_over_budget"] += len(report.over_budget)
        self._ceilings.pop(keys[2], None)
        plan = plan.superseding(current)
        self.store.replace_plan(keys, plan)
        self.counters["tunings"] += 1
        self.counters["traces_written"] += report.measured
        self.counters["traces_reused"] += report.reused
        return plan.to_recipe()

    def repair_store(self, found: str, generation: int) -> None:
        """A worker process met a damaged store file while the store was at ``generation``:
        repair it here, where the store is opened to be repaired, unless it was repaired since
        (the worker follows to the fresh file at its next job)."""
        self.store.repair(generation, UnreadableStore(found))

    def flush(self) -> dict:
        """Empty the store and the warm caches (server thread, with nothing in flight)."""
        deleted = self.store.flush()
        self._plans.clear()
        self._heuristic.clear()
        self._ceilings.clear()
        self.counters["flushes"] += 1
        return {"deleted": deleted}

    # -- stats ----------------------------------------------------------------------------
    def _clients_stats(self) -> dict[str, int]:
        chars = sum(len(who) + len(c["host"] or "") + len(c["version"] or "") + len(c["program"])
                    for who, c in self.clients.items())
        return {"kept": len(self.clients), "chars": chars}

    def stats(self, inflight: int, tuning: int = 0) -> dict[str, Any]:
        hits, misses = self.counters["plan_hits"], self.counters["plan_misses"]
        counts = self.store.counts()
        return {
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "uptime_s": round(time.time() - self.started, 3),
            "socket": self.config.endpoint,
            "store": {
                "path": self.store.location,
                "size_bytes": self.store.size_bytes(),
                "schema_version": SCHEMA_VERSION,
            } | self.store.health(),
            "clients_seen": self.counters["clients_seen"],
            "clients": self._clients_stats(),  # those listed now, and the characters they keep
            "requests": dict(self.requests),
            "plan_cache": {
                "hits": hits,
                "misses": misses,
                "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
                "plans_made": self.counters["plans_made"],
                "coalesced": self.counters["coalesced"],
                "warm_entries": len(self._plans),
                # misses told "being planned" at once; of those, answered with the plan; clients
                # that stopped waiting first (HYPATIA_PLAN_WAIT_S) and planned in-process
                "acknowledged": self.counters["plan_acks"],
                "waits_served": self.counters["plan_waits_served"],
                "waits_abandoned": self.counters["plan_waits_abandoned"],
            },
            "graphs": counts["canonical_graphs"],
            "workloads": counts["workloads"],
            "environments": counts["environments"],
            "implementations": counts["implementations"],
            "plans": counts["plans"],
            "fallbacks": self.counters["fallbacks"],
            "validation": {"passed": self.counters["validations_passed"], "failed": self.counters["validations_failed"],
                           "region_verdicts": counts["region_verdicts"]},
            "executors": {"choices": self.counters["executor_choices"],
                          "stale_reports": self.counters["executor_reports_stale"]},
            "tuning": {
                "tunings": self.counters["tunings"],
                "failed": self.counters["tunings_failed"],
                "skipped": self.counters["tunings_skipped"],
                "coalesced": self.counters["tune_coalesced"],
                "traces_written": self.counters["traces_written"],
                "traces_reused": self.counters["traces_reused"],
                "plans_from_shared_traces": self.counters["plans_from_shared_traces"],
                "background": self.config.background_tuning,
                "untunable": counts["untunable"],
                "marked_untunable": self.counters["plans_marked_untunable"],
                "skipped_untunable": self.counters["tunings_skipped_untunable"],
                "regions_over_budget": self.counters["regions_over_budget"],
                "memory_budget_mb": self.config.tune_memory_mb or None,
                "delay_s": self.config.tune_delay_s,
            },
            "planning": {
                "max_graph_nodes": self.config.max_graph_nodes,
                "deadline_s": self.config.plan_deadline_s,
                "graphs_too_large": self.counters["graphs_too_large"],
                "past_deadline": self.counters["plans_past_deadline"],
            },
            "traces": counts["benchmark_traces"],
            "errors": dict(self.errors),
            "error_total": sum(self.errors.values()),
            "corrupt_rows": self.store.counters["corrupt_rows"],
            "quarantined_rows": self.store.counters["quarantined_rows"],
            "store_quarantined": self.store.counters["store_quarantined"],
            "rules": {k[5:]: v for k, v in planner_counters.counters.items() if k.startswith("rule.")},
            "inflight": inflight,
            "tuning_inflight": tuning,
        }

