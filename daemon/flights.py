"""Single-flight planning and tuning in hypatiad, and the worker pool's results.

The server thread keeps one planning flight per (keys, policy) and one tuning per keys; every
identical request joins the flight in progress and gets the same answer. Workers and the tuner
run the jobs and push their outcomes back over an inproc socket, which only the server thread
reads (:meth:`Flights._collect_results`), so only it touches the ROUTER. A make_plan that starts or
joins a flight is acknowledged at once and told every ``PROGRESS_EVERY_S`` that the work goes on
(:meth:`Flights._progress`, from the server's heartbeat).

:class:`Flights` is a part of :class:`hypatia.daemon.server.Server`, apart because it is one idea:
it uses the server's sockets, services and pools.
"""

from __future__ import annotations

import logging

import zmq

from hypatia import limits
from hypatia.daemon.service import PlanKeys, request_policy
from hypatia.protocol import BadRequest, ErrorCode, encode_pending, encode_reply, pack, unpack

log = logging.getLogger("hypatia.daemon")

RESULTS_ENDPOINT = "inproc://hypatiad-results"


class Flights:
    """The flights of a :class:`~hypatia.daemon.server.Server` (server thread, except ``_run``)."""

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

    def _start_flight(self, identity: bytes, rid: int, body: dict) -> None:
        policy = request_policy(body, rid)
        keys, job = self.service.parse_make_plan(body, rid)
        recipe = self.service.lookup(keys, policy)
        if recipe is not None:
            self.service.counters["coalesced"] += 1
            self._send(identity, encode_reply(rid, {"plan": recipe}))
            return
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
        self._flight_jobs[flight] = (keys, policy, job)
        self.pool.submit(self._run, ["plan", flight], self._planning_job, keys, job, policy)

    def _tune(self, keys: PlanKeys, job: dict | None, waiter: tuple[bytes, int] | None = None, policy: str = "FASTEST") -> bool:
        """Queue a tuning of ``keys`` unless one is queued or running (single flight); returns
        whether a new one was queued."""
        waiters = self._tuning.get(keys)
        if waiters is not None:
            self.service.counters["tune_coalesced"] += 1
            if waiter is not None:
                waiters.append(waiter)
            return False
        self._tuning[keys] = [waiter] if waiter is not None else []
        self._tuning_jobs[keys] = job
        self.tuner.submit(self._run, ["tune", keys], self._tuning_job, keys, job, "EXPLORE" if policy == "EXPLORE" else "FASTEST")
        return True

    def _planning_job(self, keys: PlanKeys, job: dict, policy: str) -> dict:
        self.faults.planning()
        return self.service.make_plan(keys, job, policy)

    def _tuning_job(self, keys: PlanKeys, job: dict | None, policy: str) -> dict:
        self.faults.tuning()
        return self.service.tune(keys, job, policy)

    def _run(self, tag: list, fn, *args) -> None:
        """Worker or tuner thread: run ``fn`` and hand the outcome to the server thread."""
        try:
            result = [*tag, True, fn(*args)]
        except Exception as exc:
            skipped = bool(getattr(exc, "skip", False))  # not a failure: the work is not ours to do
            if skipped:
                log.warning("%s %s skipped: %s", tag[0], str(tag[1])[:40], exc)
            else:  # its waiters' error replies are not logged again
                self.failures.failed(f"{tag[0]} job", type(exc).__name__, f"{str(tag[1])[:40]}: {exc}", logging.ERROR, exc)
            result = [*tag, False, {"skipped": skipped, "error": f"{type(exc).__name__}: {exc}"}]
        push = getattr(self._local, "push", None)
        if push is None:
            push = self._local.push = self.ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(RESULTS_ENDPOINT)
        push.send(pack(result))

    def _collect_results(self) -> None:
        while True:
            try:
                data = self.results.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, tag, ok, payload = unpack(data, 1 << 30)
            if kind == "run":
                self._finish_run(tag, ok, payload)
                continue
            if kind == "plan":
                keys, policy, job = self._flight_jobs.pop(tag)
                waiters = self._flights.pop((keys, policy), [])
                if ok:
                    self.service.planned(keys, payload)
                    if self.service.wants_tuning(payload, policy) and not self.stopping:
                        self._tune(keys, job)
            else:
                keys = tuple(tag)
                waiters = [w for w in self._tuning.pop(keys, []) if w is not None]
                job = self._tuning_jobs.pop(keys, None)
                outcome = "done" if ok else ("skipped" if payload["skipped"] else "failed")
                if ok:
                    self.service.planned(keys, payload, tuned=True)
                else:
                    self.service.counters[f"tunings_{outcome}"] += 1
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
                else:
                    self._error(identity, rid, ErrorCode.INTERNAL, f"{kind} failed: {payload['error']}", logged=True)

    def _finish_run(self, flight: int, ok: bool, outcome: dict) -> None:
        """A worker finished a remote-mode run: count it and answer its client."""
        identity, rid = self._runs.pop(flight)
        if not ok:  # the run raised past its own handler
            outcome = {"ok": False, "code": int(ErrorCode.INTERNAL), "message": outcome["error"]}
        self.runs.finished(outcome)
        if outcome["ok"]:
            self._send(identity, encode_reply(rid, {"outputs": outcome["outputs"]}))
        elif not outcome.get("abandoned"):  # an abandoned run has nobody waiting for it
            code = ErrorCode(outcome.get("code", ErrorCode.INTERNAL))
            self._error(identity, rid, code, outcome.get("message", "the client gave up on this run"), "run",
                        logged=code == ErrorCode.INTERNAL)

    # -- hypatia-ctl tune -------------------------------------------------------------------
    def _tune_batch(self, body: dict, rid: int) -> dict:
        """Queue every untuned plan (whose graph key starts with ``graph_key``, if given)."""
        prefix = limits.text(body, "graph_key", limits.MAX_KEY_CHARS, rid, default="")  # a key or its prefix
        keys = [(r["graph_key"], r["workload_key"], r["env_key"]) for r in self.service.store.plan_rows(untuned_only=True)
                if r["graph_key"].startswith(prefix)]
        for k in keys:
            self._tune(k, None)
        batch = next(self._batch_ids)
        self._batches[batch] = {"total": len(keys), "pending": set(keys), "done": 0, "failed": 0, "skipped": 0}
        while len(self._batches) > 64:
            self._batches.pop(next(iter(self._batches)))
        return {"batch": batch, "queued": len(keys)}

    def _batch_status(self, body: dict, rid: int) -> dict:
        number = limits.integer(body, "batch", 0, 2**63 - 1, rid, required=True)
        batch = self._batches.get(number)
        if batch is None:
            raise BadRequest(f"no tuning batch {number} (the daemon restarted, or it is too old)", rid)
        return {k: (len(v) if isinstance(v, set) else v) for k, v in batch.items()}
