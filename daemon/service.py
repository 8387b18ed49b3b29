"""What hypatiad answers: handshake, plan lookups, planning, reports and stats.

Lookups run on the server thread against an in-memory cache backed by the store. Planning runs
on worker threads; the server keeps one flight per (graph, workload, environment) so that
concurrent identical requests are planned once and all get the same answer.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter, OrderedDict
from typing import Any

from hypatia import __version__
from hypatia.canonical import CanonicalGraph, GraphFormatError, environment_key, workload_key
from hypatia.config import Config
from hypatia.kernels import by_id
from hypatia.planner import counters as planner_counters
from hypatia.planner import plan_graph
from hypatia.planner.plan import Plan
from hypatia.planner.store import SCHEMA_VERSION, Store
from hypatia.protocol import PROTOCOL_VERSION, BadRequest, VersionMismatch, require

log = logging.getLogger("hypatia.daemon")

PlanKeys = tuple[str, str, str]
MAX_CACHED_PLANS = 100_000
MAX_CLIENTS_LISTED = 4096


def plan_keys(body: dict, request_id: int) -> PlanKeys:
    return (
        require(body, "graph_key", str, request_id),
        require(body, "workload_key", str, request_id),
        require(body, "env_key", str, request_id),
    )


class PlanService:
    def __init__(self, config: Config, store: Store):
        self.config = config
        self.store = store
        self.started = time.time()
        self.counters: Counter = Counter()
        self.requests: Counter = Counter()
        self.errors: Counter = Counter()
        self.clients: OrderedDict[str, dict] = OrderedDict()
        self._plans: OrderedDict[PlanKeys, dict] = OrderedDict()

    # -- handshake ------------------------------------------------------------------------
    def hello(self, body: dict, request_id: int) -> dict:
        protocol = body.get("protocol")
        if protocol != PROTOCOL_VERSION:
            raise VersionMismatch(
                f"client speaks protocol {protocol!r}, hypatiad {__version__} speaks {PROTOCOL_VERSION}; "
                "upgrade the older side and restart the daemon",
                request_id,
            )
        who = f"{body.get('host', '?')}:{body.get('pid', '?')}"
        if who not in self.clients:
            self.counters["clients_seen"] += 1
        self.clients[who] = {
            "pid": body.get("pid"),
            "host": body.get("host"),
            "version": body.get("version"),
            "program": str(body.get("program", ""))[:200],
            "last_seen": time.time(),
        }
        self.clients.move_to_end(who)
        while len(self.clients) > MAX_CLIENTS_LISTED:
            self.clients.popitem(last=False)
        return {"protocol": PROTOCOL_VERSION, "version": __version__, "pid": os.getpid()}

    # -- plans ----------------------------------------------------------------------------
    def lookup(self, keys: PlanKeys) -> dict | None:
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

    def _remember(self, keys: PlanKeys, recipe: dict) -> None:
        self._plans[keys] = recipe
        while len(self._plans) > MAX_CACHED_PLANS:
            self._plans.popitem(last=False)

    def get_plan(self, body: dict, request_id: int) -> dict:
        recipe = self.lookup(plan_keys(body, request_id))
        self.counters["plan_hits" if recipe is not None else "plan_misses"] += 1
        return {"plan": recipe}

    def parse_make_plan(self, body: dict, request_id: int) -> tuple[PlanKeys, dict]:
        """Validate a make_plan body on the server thread; the work itself is :meth:`make_plan`."""
        keys = plan_keys(body, request_id)
        try:
            graph = CanonicalGraph.from_wire(require(body, "graph", dict, request_id))
        except GraphFormatError as exc:
            raise BadRequest(f"graph: {exc}", request_id) from None
        if graph.key != keys[0]:
            raise BadRequest("graph_key does not match the graph sent (client and daemon hash differently)", request_id)
        workload = require(body, "workload", list, request_id)
        if workload_key(workload)[0] != keys[1]:
            raise BadRequest("workload_key does not match the workload sent", request_id)
        env = require(body, "environment", dict, request_id)
        if environment_key(env)[0] != keys[2]:
            raise BadRequest("env_key does not match the environment sent", request_id)
        return keys, {"graph": graph, "wire": body["graph"], "workload": workload, "environment": env}

    def make_plan(self, keys: PlanKeys, job: dict) -> dict:
        """Plan one graph and store it (worker thread); returns the recipe."""
        stored = self.store.get_plan(keys)
        if stored is not None:
            return stored.to_recipe()
        start = time.perf_counter()
        plan: Plan = plan_graph(job["graph"], env=job["environment"])
        implementations = []
        for kernel_id in sorted({r.kernel for r in plan.regions}):
            spec = by_id(kernel_id)
            implementations.append(
                {
                    "id": spec.id,
                    "op": spec.op,
                    "backend": spec.backend.value,
                    "signature": spec.signature,
                    "target": spec.target,
                    "description": spec.description,
                }
            )
        self.store.put_plan(keys, job["wire"], job["workload"], job["environment"], plan, implementations)
        elapsed = time.perf_counter() - start
        log.info(
            "planned %s (%d nodes, %d regions %s) in %.1f ms",
            keys[0][:16], len(job["graph"].nodes), len(plan.regions), plan.rules_fired, elapsed * 1e3,
        )
        return plan.to_recipe() | {"planning_ms": round(elapsed * 1e3, 3)}

    def planned(self, keys: PlanKeys, recipe: dict) -> None:
        """Server thread: a flight landed; later lookups hit the warm cache."""
        self.counters["plans_made"] += 1
        self._remember(keys, recipe)

    # -- reports and stats ----------------------------------------------------------------
    def report(self, body: dict, request_id: int) -> dict:
        fallbacks = body.get("fallbacks", 0)
        if not isinstance(fallbacks, int) or fallbacks < 0 or fallbacks > 1_000_000:
            raise BadRequest("fallbacks must be a small non-negative integer", request_id)
        self.counters["fallbacks"] += fallbacks
        reason = str(body.get("reason", ""))[:500]
        if fallbacks:
            log.warning("client %s reported %d fallback(s) to eager: %s", body.get("pid"), fallbacks, reason)
        if "verdicts" in body:
            return {"plan": self._record_verdicts(plan_keys(body, request_id), body["verdicts"], request_id)}
        return {}

    def _record_verdicts(self, keys: PlanKeys, raw: Any, request_id: int) -> dict | None:
        """Strict validation results from a client: stored, counted, and failing regions
        dropped from the plan so no later process runs them. Returns the revised recipe."""
        if not isinstance(raw, list) or len(raw) > 10_000:
            raise BadRequest("verdicts must be a list", request_id)
        verdicts = []
        for v in raw:
            if not isinstance(v, dict):
                raise BadRequest("each verdict must be a map", request_id)
            verdicts.append({
                "region": require(v, "region", int, request_id),
                "rule": str(require(v, "rule", str, request_id))[:100],
                "kernel": str(require(v, "kernel", str, request_id))[:200],
                "ok": bool(require(v, "ok", bool, request_id)),
                "max_abs_err": float(v.get("max_abs_err") or 0.0),
                "max_rel_err": float(v.get("max_rel_err") or 0.0),
                "detail": str(v.get("detail", ""))[:500],
            })
        current = self.store.get_plan(keys)
        if current is None:
            return None
        failed = {v["region"] for v in verdicts if not v["ok"]}
        passed = {v["region"] for v in verdicts if v["ok"]}
        self.counters["validations_passed"] += len(passed)
        self.counters["validations_failed"] += len(failed)
        for v in verdicts:
            if not v["ok"]:
                log.warning("region %s (%s) failed validation: %s; it now runs unfused", v["region"], v["rule"], v["detail"])
        revised = current.without(failed, passed)
        self.store.record_verdicts(keys, verdicts, revised)
        recipe = revised.to_recipe()
        self._remember(keys, recipe)
        return recipe

    def stats(self, inflight: int) -> dict[str, Any]:
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
                "path": str(self.store.path),
                "size_bytes": self.store.size_bytes(),
                "schema_version": SCHEMA_VERSION,
            },
            "clients_seen": self.counters["clients_seen"],
            "requests": dict(self.requests),
            "plan_cache": {
                "hits": hits,
                "misses": misses,
                "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
                "plans_made": self.counters["plans_made"],
                "coalesced": self.counters["coalesced"],
                "warm_entries": len(self._plans),
            },
            "graphs": counts["canonical_graphs"],
            "workloads": counts["workloads"],
            "environments": counts["environments"],
            "implementations": counts["implementations"],
            "plans": counts["plans"],
            "fallbacks": self.counters["fallbacks"],
            "validation": {"passed": self.counters["validations_passed"], "failed": self.counters["validations_failed"]},
            "errors": dict(self.errors),
            "error_total": sum(self.errors.values()),
            "corrupt_rows": self.store.counters["corrupt_rows"],
            "rules": {k[5:]: v for k, v in planner_counters.counters.items() if k.startswith("rule.")},
            "inflight": inflight,
        }
