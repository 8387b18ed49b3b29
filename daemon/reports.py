"""What clients report to hypatiad: fallbacks to eager, the executor they measured for a plan,
and the verdicts of strict validation. Part of :class:`~hypatia.daemon.service.PlanService`
(server thread), apart because it is one idea: what a client learned that every later process
should know."""

from __future__ import annotations

import logging
from typing import Any

from hypatia import limits
from hypatia.executors import UnknownCandidate, parse as parse_candidate
from hypatia.planner.plan import ExecutorDecision
from hypatia.protocol import BadRequest, require

log = logging.getLogger("hypatia.daemon")

PlanKeys = tuple[str, str, str]


def plan_keys(body: dict, request_id: int) -> PlanKeys:
    return (
        limits.text(body, "graph_key", limits.MAX_KEY_CHARS, request_id, required=True),
        limits.text(body, "workload_key", limits.MAX_KEY_CHARS, request_id, required=True),
        limits.text(body, "env_key", limits.MAX_KEY_CHARS, request_id, required=True),
    )


class Reports:
    """The report handlers of :class:`~hypatia.daemon.service.PlanService` (which provides
    ``store``, ``counters`` and ``_remember``)."""

    def report(self, body: dict, request_id: int) -> dict:
        fallbacks = limits.integer(body, "fallbacks", 0, limits.MAX_FALLBACKS, request_id, default=0)
        reason = limits.text(body, "reason", limits.MAX_REASON_CHARS, request_id, cut=True, default="")
        pid = limits.integer(body, "pid", 0, limits.MAX_PID, request_id)
        self.counters["fallbacks"] += fallbacks
        gave_up = limits.integer(body, "gave_up", 0, limits.MAX_FALLBACKS, request_id, default=0)
        self.counters["plan_waits_abandoned"] += gave_up  # clients that stopped waiting for a plan
        if fallbacks:
            log.warning("client %s reported %d fallback(s) to eager: %s", pid, fallbacks, reason)
        if "verdicts" in body:
            return {"plan": self._record_verdicts(plan_keys(body, request_id), body["verdicts"], request_id)}
        if "executor" in body:
            return {"plan": self._record_executor(plan_keys(body, request_id), body["executor"], request_id)}
        return {}

    def _record_executor(self, keys: PlanKeys, raw: Any, request_id: int) -> dict | None:
        """A client's measured executor choice for the graph a plan revision rewrites: stored
        with the plan, so every later process (and host) builds only the chosen executor.
        A report for an older revision (the plan was tuned or revised since) is dropped."""
        if not isinstance(raw, dict):
            raise BadRequest("executor must be a map", request_id)
        revision = require(raw, "revision", int, request_id)
        times, most = raw.get("times"), limits.MAX_EXECUTOR_TIMES
        if not isinstance(times, list) or not 0 < len(times) <= most:
            raise BadRequest(f"executor.times must list the measured candidates (at most {most})", request_id)
        # a candidate's error is free text, stored with the plan: cut, not refused
        cut = limits.MAX_DETAIL_CHARS
        times = [t | {"error": t["error"][:cut]} if isinstance(t, dict) and isinstance(t.get("error"), str) else t
                 for t in times]
        try:
            decision = ExecutorDecision.from_dict({"chosen": raw.get("chosen"), "training": raw.get("training"),
                                                   "times": times})
            for name in [decision.chosen, *(t.name for t in decision.times)]:
                parse_candidate(name)
        except (KeyError, TypeError, ValueError, UnknownCandidate) as exc:
            raise BadRequest(f"executor: {exc}", request_id) from None
        if decision.chosen not in {t.name for t in decision.times if not t.error}:
            raise BadRequest("executor.chosen must be one of the candidates measured without error", request_id)
        return self.record_executor(keys, revision, decision)

    def record_executor(self, keys: PlanKeys, revision: int, decision: ExecutorDecision) -> dict | None:
        """Store ``decision`` with the plan of ``keys`` if it is still at ``revision`` (server
        thread); the revised recipe, or None for a stale report."""
        current = self.store.get_plan(keys)
        if current is None or current.revision != revision:
            self.counters["executor_reports_stale"] += 1
            return None
        revised = current.with_executor(decision)
        self.store.replace_plan(keys, revised)
        self.counters["executor_choices"] += 1
        log.info("executor for %s (revision %d): %s, measured %s", keys[0][:16], revision, decision.chosen,
                 {t.name: t.median_us for t in decision.times})
        recipe = revised.to_recipe()
        self._remember(keys, recipe)
        return recipe

    def _record_verdicts(self, keys: PlanKeys, raw: Any, request_id: int) -> dict | None:
        """Strict validation results from a client: stored, counted, and failing regions
        dropped from the plan so no later process runs them. Returns the revised recipe."""
        if not isinstance(raw, list) or len(raw) > limits.MAX_VERDICTS:
            raise BadRequest(f"verdicts must be a list of at most {limits.MAX_VERDICTS}", request_id)
        verdicts = []
        for k, v in enumerate(raw):
            if not isinstance(v, dict):
                raise BadRequest("each verdict must be a map", request_id)
            try:
                verdicts.append(_verdict(v, request_id))
            except BadRequest as exc:
                raise BadRequest(f"verdict {k}: {exc}", request_id) from None
        self.store.put_region_verdicts(keys[2], [v for v in verdicts if "region_key" in v])
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
        self.store.record_verdicts(keys, [{k: v[k] for k in v if k not in ("region_key", "implementation_id")}
                                          for v in verdicts], revised)
        recipe = revised.to_recipe()
        self._remember(keys, recipe)
        return recipe

def _verdict(v: dict, request_id: int) -> dict:
    """One verdict of a report as stored: names refused past their limits, the detail cut."""
    verdict = {
        "region": limits.integer(v, "region", 0, limits.MAX_REGION, request_id, required=True),
        "rule": limits.text(v, "rule", limits.MAX_NAME_CHARS, request_id, required=True),
        "kernel": limits.text(v, "kernel", limits.MAX_NAME_CHARS, request_id, required=True),
        "ok": require(v, "ok", bool, request_id),
        "max_abs_err": limits.number(v, "max_abs_err", request_id),
        "max_rel_err": limits.number(v, "max_rel_err", request_id),
        "detail": limits.text(v, "detail", limits.MAX_DETAIL_CHARS, request_id, cut=True, default=""),
    }
    rkey = limits.text(v, "region_key", limits.MAX_KEY_CHARS, request_id)
    impl = limits.text(v, "implementation", limits.MAX_NAME_CHARS, request_id)
    if rkey is not None and rkey.startswith("r1-") and impl is not None:
        verdict |= {"region_key": rkey, "implementation_id": impl}
    return verdict
