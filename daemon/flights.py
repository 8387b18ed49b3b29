"""Single flight: who waits for which planning, tuning or hypatia-device request, and what each gets
when its job lands.

One planning flight per (graph, workload, environment, policy) and one tuning per plan, however
many clients ask at once; every waiter gets the same answer. A planning that ran past the
deadline is remembered, and its graph refused at once until a restart; a tuning that failed is
recorded as untunable in the store. The server thread alone runs these methods (mixed into
:class:`~hypatia.daemon.server.Server`, which provides ``service``, ``jobs``, ``_send`` and
``_error``). A make_plan that starts or joins a flight is acknowledged at once and told every
``PROGRESS_EVERY_S`` that the work goes on (:meth:`Flights._progress`, from the server's
heartbeat), so that its client keeps waiting however loaded the host is.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import zmq

from hypatia import limits
from hypatia.daemon.service import PlanKeys, request_policy
from hypatia.planner import counters as planner_counters
from hypatia.protocol import BadRequest, DeadlineExceeded, ErrorCode, encode_pending, encode_reply, unpack

MAX_ABANDONED = 1024  # graphs whose planning ran past the deadline, refused at once until a restart


class Flights:
    def _init_flights(self) -> None:
        self._flights: dict[tuple[PlanKeys, str], list[tuple[bytes, int]]] = {}
        self._flight_ids = itertools.count(1)
        self._flight_jobs: dict[int, tuple[PlanKeys, str, dict]] = {}
        self._tuning: dict[PlanKeys, list[tuple[bytes, int]]] = {}  # queued or running, with waiters
        self._tuning_jobs: dict[PlanKeys, dict | None] = {}
        self._abandoned: OrderedDict[PlanKeys, str] = OrderedDict()
        self._batches: dict[int, dict] = {}  # hypatia-ctl tune requests and their progress
        self._batch_ids = itertools.count(1)
        self._runs: dict[int, tuple[bytes, int]] = {}  # hypatia-device requests on the worker pool, by flight id

    def _acknowledge(self, identity: bytes, rid: int, state: str) -> None:
        """Tell a make_plan's client at once that its plan is being made: it waits for it."""
        self.service.counters["plan_acks"] += 1
        self._send(identity, encode_pending(rid, {"state": state}))

    def _progress(self) -> None:
        """Tell every client waiting on a planning or a measuring flight that it goes on."""
        for state, flights in (("planning", self._flights.values()), ("tuning", self._tuning.values())):
            for waiters in flights:
                for waiter in waiters:
                    if waiter is not None:
                        self._send(waiter[0], encode_pending(waiter[1], {"state": state}))

    # -- flights (single-flight planning) -------------------------------------------------
    def _start_flight(self, identity: bytes, rid: int, body: dict) -> None:
        policy = request_policy(body, rid)
        keys, job = self.service.parse_make_plan(body, rid)
        recipe = self.service.lookup(keys, policy)
        if recipe is None and policy == "EXPLORE" and self.service.untunable(keys):
            self.service.counters["tunings_skipped_untunable"] += 1  # measuring failed before: the plan there is
            policy = "HEURISTIC"
            recipe = self.service.stored(keys)
        if recipe is not None:
            self.service.counters["coalesced"] += 1
            self._send(identity, encode_reply(rid, {"plan": recipe}))
            return
        if keys in self._abandoned:
            raise DeadlineExceeded(self._abandoned[keys], rid)
        if policy == "EXPLORE":  # measured before answering: a tuning flight with a waiter
            self._tune(keys, job, (identity, rid), policy)
            self._acknowledge(identity, rid, "tuning")
            return
        waiters = self._flights.get((keys, policy))
        if waiters is not None:
            self.service.counters["coalesced"] += 1
            waiters.append((identity, rid))
        else:
            self._plan_flight(keys, policy, job, [(identity, rid)])
        self._acknowledge(identity, rid, "planning")

    def _plan_flight(self, keys: PlanKeys, policy: str, job: dict, waiters: list[tuple[bytes, int]]) -> None:
        self._flights[(keys, policy)] = waiters
        flight = next(self._flight_ids)
        # the store as the job found it: a damage its worker reports is repaired once, not again
        job = dict(job, store_generation=self.service.store.generation)
        self._flight_jobs[flight] = (keys, policy, job)
        self.jobs.plan(flight, keys, job, policy)

    def _tune(self, keys: PlanKeys, job: dict | None, waiter: tuple[bytes, int] | None = None, policy: str = "FASTEST",
              delay: float = 0.0) -> bool:
        """Queue a tuning of ``keys`` unless one is queued or running (single flight); returns
        whether a new one was queued. A ``delay`` holds it back that many seconds, or until its
        client reports, so that it does not compete with the client's own compile."""
        waiters = self._tuning.get(keys)
        if waiters is not None:
            self.service.counters["tune_coalesced"] += 1
            if waiter is not None:
                waiters.append(waiter)
                self.jobs.release(keys)  # someone waits for it now
            return False
        self._tuning[keys] = [waiter] if waiter is not None else []
        self._tuning_jobs[keys] = job
        self.jobs.tune(keys, job, "EXPLORE" if policy == "EXPLORE" else "FASTEST", delay)
        return True

    def _collect_results(self) -> None:
        while True:
            try:
                data = self.results.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, tag, ok, payload, counters = unpack(data, 1 << 30)
            self._count(counters)
            if kind == "run":
                self._finish_run(tag, ok, payload)
                continue
            if kind == "plan":
                keys, policy, job = self._flight_jobs.pop(tag)
                waiters = self._flights.pop((keys, policy), [])
                if not ok and payload["damaged"] and not job.get("after_repair") and not self.stopping:
                    # the worker met a damaged store file, which only the daemon repairs: repair it
                    # (moved aside, readable rows kept) and plan once more against the fresh one
                    self.service.repair_store(payload["error"], job["store_generation"])
                    self._plan_flight(keys, policy, dict(job, after_repair=True), waiters)
                    continue
                if ok:
                    self.service.planned(keys, payload)
                    if self.service.wants_tuning(keys, payload, policy) and not self.stopping:
                        self._tune(keys, job, delay=self.config.tune_delay_s)
                elif payload["deadline"]:
                    self._abandon(keys)
            else:
                keys = tuple(tag)
                waiters = [w for w in self._tuning.pop(keys, []) if w is not None]
                job = self._tuning_jobs.pop(keys, None)
                outcome = "done" if ok else ("skipped" if payload["skipped"] else "failed")
                if ok:
                    self.service.planned(keys, payload, tuned=True)
                else:
                    self.service.counters[f"tunings_{outcome}"] += 1
                    if outcome == "failed" and not (payload["stopped"] or payload["transient"] or self.stopping):
                        self.service.mark_untunable(keys, payload["error"])
                for batch in self._batches.values():
                    if keys in batch["pending"]:
                        batch["pending"].discard(keys)
                        batch[outcome] += 1
            fallback = None if ok or kind == "plan" else self.service.stored(keys)  # a failed tuning: the plan we have
            if not ok and kind == "tune" and waiters and fallback is None and job is not None and not self.stopping:
                # nothing stored yet: plan it without measuring (joining such a flight if one runs)
                if (keys, "HEURISTIC") in self._flights:
                    self._flights[(keys, "HEURISTIC")].extend(waiters)
                else:
                    self._plan_flight(keys, "HEURISTIC", job, waiters)
                continue
            for identity, rid in waiters:
                if ok or fallback is not None:
                    self.service.counters["plan_waits_served"] += 1  # every waiter was acknowledged
                    self._send(identity, encode_reply(rid, {"plan": payload if ok else fallback}))
                elif kind == "plan" and payload["deadline"]:
                    self._error(identity, rid, ErrorCode.DEADLINE_EXCEEDED, self._abandoned[keys], logged=True)
                elif payload["stopped"]:
                    self._error(identity, rid, ErrorCode.SHUTTING_DOWN, "hypatiad is shutting down; retry or plan locally",
                                logged=True)
                else:
                    self._error(identity, rid, ErrorCode.INTERNAL, f"{kind} failed: {payload['error']}", logged=True)

    def _count(self, counters: dict) -> None:
        """Add what a worker counted to the counters the stats read."""
        for name, target in (("service", self.service.counters), ("planner", planner_counters.counters),
                             ("store", self.service.store.counters)):
            target.update(counters.get(name) or {})

    def _abandon(self, keys: PlanKeys) -> None:
        """A planning of ``keys`` ran past the deadline: refuse the graph at once until a restart."""
        self.service.counters["plans_past_deadline"] += 1
        self._abandoned[keys] = (
            f"planning this graph ran past the daemon's deadline of {self.config.plan_deadline_s} s "
            "(HYPATIA_PLAN_DEADLINE_S) and was abandoned; it runs unrewritten. Raise HYPATIA_PLAN_DEADLINE_S "
            "for the daemon to plan it")
        while len(self._abandoned) > MAX_ABANDONED:
            self._abandoned.popitem(last=False)

    def _finish_run(self, flight: int, ok: bool, outcome: dict) -> None:
        """A worker finished a hypatia-device request: answer its client."""
        identity, rid = self._runs.pop(flight)
        if not ok:  # the request raised past its own handler
            outcome = {"ok": False, "code": int(ErrorCode.INTERNAL), "message": outcome["error"]}
        if outcome["ok"]:
            self._send(identity, encode_reply(rid, outcome["reply"]))
        else:
            self._error(identity, rid, ErrorCode(outcome.get("code", ErrorCode.INTERNAL)), outcome["message"], "device")

    # -- hypatia-ctl tune -------------------------------------------------------------------
    def _tune_batch(self, body: dict, rid: int) -> dict:
        """Queue every untuned plan (whose graph key starts with ``graph_key``, if given)."""
        prefix = limits.text(body, "graph_key", limits.MAX_KEY_CHARS, rid, default="")  # a key or its prefix
        keys = [(r["graph_key"], r["workload_key"], r["env_key"]) for r in self.service.store.plan_rows(untuned_only=True)
                if r["graph_key"].startswith(prefix)]
        untunable = [k for k in keys if self.service.untunable(k)]  # failed before: not tried again
        keys = [k for k in keys if not self.service.untunable(k)]
        for k in keys:
            self._tune(k, None)
            self.jobs.release(k)  # asked for now, even if a background tuning was waiting
        batch = next(self._batch_ids)
        self._batches[batch] = {"total": len(keys), "pending": set(keys), "done": 0, "failed": 0, "skipped": 0,
                                "untunable": len(untunable)}
        while len(self._batches) > 64:
            self._batches.pop(next(iter(self._batches)))
        return {"batch": batch, "queued": len(keys), "untunable": len(untunable)}

    def _batch_status(self, body: dict, rid: int) -> dict:
        number = limits.integer(body, "batch", 0, 2**63 - 1, rid, required=True)
        batch = self._batches.get(number)
        if batch is None:
            raise BadRequest(f"no tuning batch {number} (the daemon restarted, or it is too old)", rid)
        return {k: (len(v) if isinstance(v, set) else v) for k, v in batch.items()}

    # -- stopping ---------------------------------------------------------------------------
    def _cancel_waiters(self) -> None:
        """Tell every client still waiting that the daemon is going (it plans locally)."""
        waiting = [w for ws in (*self._flights.values(), *self._tuning.values()) for w in ws if w is not None]
        for identity, rid in [*waiting, *self._runs.values()]:
            self._error(identity, rid, ErrorCode.SHUTTING_DOWN,
                        "hypatiad stopped before this request was done (HYPATIA_DRAIN_TIMEOUT_S); retry or plan locally")
