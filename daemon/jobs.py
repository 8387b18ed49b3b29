"""Where hypatiad's work runs: planning and hypatia-device requests on a small thread pool, tuning on
one tuner thread, and planning and tuning themselves in worker processes under a deadline
(:mod:`hypatia.daemon.workers`). Each outcome goes back to the server thread as one message on
an inproc PUSH socket: ``[kind, tag, ok, payload, counters]``.

A background tuning can wait: it starts when its client has reported on the plan, or after
``HYPATIA_TUNE_DELAY_S``, so that it does not take the cores of the client's own compile.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import zmq

from hypatia.config import Config
from hypatia.daemon.failures import FailureLog
from hypatia.daemon.workers import JobDeadline, WorkerFailed, WorkerPool, WorkerStopped
from hypatia.protocol import pack

log = logging.getLogger("hypatia.daemon")

RESULTS_ENDPOINT = "inproc://hypatiad-results"
EXIT_JOIN_S = 5.0  # how long the threads get to finish once the workers are killed
PlanKeys = tuple[str, str, str]


def _request(op: str, keys: PlanKeys, job: dict | None, policy: str) -> dict:
    """A worker's request: the job without its parsed graph (the worker parses the wire form)."""
    wire = None if job is None else {k: job[k] for k in ("wire", "workload", "environment", "model") if k in job}
    return {"op": op, "keys": list(keys), "job": wire, "policy": policy}


class Jobs:
    """The daemon's threads and worker processes, started with the server and stopped with it."""

    def __init__(self, config: Config, ctx: zmq.Context, threads: int, failures: FailureLog | None = None):
        self.config = config
        self.ctx = ctx
        self.failures = failures or FailureLog(log)  # one rate-limited line per failed job
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hypatiad-plan")
        self.tuner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hypatiad-tune")
        # one planning worker ready before the first request; the tuner's (torch) when first needed
        self.planners = WorkerPool("plan", config.start_timeout_s, keep=1)
        self.tuners = WorkerPool("tune", config.start_timeout_s)
        self._waiting: dict[PlanKeys, tuple[float, dict | None, str]] = {}  # tunings not started: (due, job, policy)
        self._local = threading.local()
        self.stuck_threads = 0

    # -- submitting -------------------------------------------------------------------------
    def plan(self, flight: int, keys: PlanKeys, job: dict, policy: str) -> None:
        self.pool.submit(self._run, ["plan", flight], self.planners.run, _request("plan", keys, job, policy),
                         self.config.plan_deadline_s)

    def tune(self, keys: PlanKeys, job: dict | None, policy: str, delay: float = 0.0) -> None:
        """Tune ``keys`` now, or once ``delay`` seconds have passed or :meth:`release` is called."""
        self._waiting[keys] = (time.monotonic() + delay, job, policy)
        if delay <= 0:
            self.release(keys)

    def release(self, keys: PlanKeys) -> None:
        """Start a tuning that waits for its delay, now."""
        if keys in self._waiting:
            _, job, policy = self._waiting.pop(keys)
            self.tuner.submit(self._run, ["tune", keys], self.tuners.run, _request("tune", keys, job, policy),
                              self.config.tune_timeout_s)

    def release_due(self, now: float) -> None:
        for keys in [k for k, (due, _, _) in self._waiting.items() if due <= now]:
            self.release(keys)

    def waiting(self) -> list[PlanKeys]:
        """The tunings that have not started yet."""
        return list(self._waiting)

    def drop_waiting(self) -> list[PlanKeys]:
        """Forget the tunings that have not started (a flush); returns their keys."""
        dropped, self._waiting = list(self._waiting), {}
        return dropped

    def run(self, flight: int, fn: Callable[..., dict], *args: Any) -> None:
        """A hypatia-device request, on the pool's threads in this process."""
        self.pool.submit(self._run, ["run", flight], fn, *args)

    # -- on the pool threads ----------------------------------------------------------------
    def _run(self, tag: list, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` and hand its outcome (and what a worker counted) to the server thread."""
        try:
            out = fn(*args)
            value, counters = out if isinstance(out, tuple) else (out, {})
            result = [*tag, True, value, counters]
        except Exception as exc:
            skipped = bool(getattr(exc, "skip", False))  # not a failure: the work is not ours to do
            if isinstance(exc, WorkerStopped):
                log.info("%s %s cancelled: %s", tag[0], str(tag[1])[:40], exc)
            elif isinstance(exc, WorkerFailed):  # the worker logged its traceback, if any
                (log.warning if skipped else log.error)("%s %s failed: %s", tag[0], str(tag[1])[:40], exc)
            else:  # a defect of the daemon's own: one line, its traceback at DEBUG
                self.failures.failed(f"{tag[0]} job", type(exc).__name__, f"{str(tag[1])[:40]}: {exc}", logging.ERROR, exc)
            error = str(exc) if isinstance(exc, WorkerFailed) else f"{type(exc).__name__}: {exc}"
            result = [*tag, False, {"skipped": skipped, "error": error, "deadline": isinstance(exc, JobDeadline),
                                    "stopped": isinstance(exc, WorkerStopped),
                                    "transient": bool(getattr(exc, "transient", False)),
                                    "damaged": bool(getattr(exc, "damaged", False))},
                      getattr(exc, "counters", {})]
        push = getattr(self._local, "push", None)
        if push is None:
            push = self._local.push = self.ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(RESULTS_ENDPOINT)
        push.send(pack(result))

    # -- stopping and stats -----------------------------------------------------------------
    def stop(self) -> None:
        """Cancel what is planning or tuning (its workers are killed), drop what is queued, and
        let the threads end; one that stays busy (a device request) is left behind and counted
        in ``stuck_threads``, so that the process can exit without it."""
        self.planners.stop()
        self.tuners.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.tuner.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + EXIT_JOIN_S
        busy = [t for t in threading.enumerate() if t.name.startswith(("hypatiad-plan", "hypatiad-tune"))]
        for thread in busy:
            thread.join(max(deadline - time.monotonic(), 0))
        self.stuck_threads = sum(t.is_alive() for t in busy)
        if self.stuck_threads:
            log.error("%d job thread(s) still busy at exit; exiting without them", self.stuck_threads)

    def stats(self) -> dict[str, dict]:
        """What the workers are doing, for the ``planning`` and ``tuning`` sections of the stats."""
        return {
            "planning": {"workers": self.planners.pids(), "worker_events": dict(self.planners.counters)},
            "tuning": {"worker": (self.tuners.pids() or [None])[0], "waiting": len(self._waiting),
                       "worker_events": dict(self.tuners.counters)},
        }
