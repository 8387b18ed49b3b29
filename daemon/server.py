"""hypatiad's server loop: a ZeroMQ ROUTER on the per-user ipc socket.

Cheap requests (hello, ping, get_plan, report, stats, tune_status, flush) are answered on this
thread; planning and remote-mode runs go to a small worker pool and tuning to one tuner thread,
whose results come back over an inproc PULL socket, so that only this thread ever touches the
ROUTER. SIGTERM stops
intake, drains the flights in progress (queued background tunings are dropped) and exits.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from hypatia import __version__
from hypatia.config import Config, ConfigError, ensure_private_dir
from hypatia.daemon.faults import Faults
from hypatia.daemon.lock import PidLock
from hypatia.daemon.notify import sd_notify, watchdog_interval
from hypatia.daemon.remote import RunService
from hypatia.daemon.zap import COUNTERS as ZAP_COUNTERS, DOMAIN, TCP_DOMAIN, ZapHandler
from hypatia.keys import KeysError, server_keys
from hypatia.daemon.service import PlanKeys, PlanService, plan_keys, request_policy
from hypatia.planner.store import Store, StoreError
from hypatia.protocol import (
    BadRequest,
    Busy,
    ErrorCode,
    ProtocolError,
    decode_request,
    encode_error,
    encode_reply,
    pack,
    unpack,
)

log = logging.getLogger("hypatia.daemon")

RESULTS_ENDPOINT = "inproc://hypatiad-results"
STATUS_EVERY_S = 5.0  # how often STATUS= is refreshed for systemctl status
MAX_HANDSHAKEN_PEERS = 65536
DRAIN_TIMEOUT_S = 60.0
LOCAL, TCP = b"l", b"t"  # the first byte of a peer's identity inside the daemon: which socket it came in on


class StartFailed(Exception):
    """The daemon could not start serving; the message says why."""


class Server:
    def __init__(self, config: Config, workers: int = 2):
        self.config = config
        self.faults = Faults.parse(config.faults)
        self.workers = workers
        self.stopping = False
        self._flights: dict[tuple[PlanKeys, str], list[tuple[bytes, int]]] = {}
        self._flight_ids = itertools.count(1)
        self._flight_jobs: dict[int, tuple[PlanKeys, str, dict]] = {}
        self._tuning: dict[PlanKeys, list[tuple[bytes, int]]] = {}  # queued or running, with waiters
        self._tuning_jobs: dict[PlanKeys, dict | None] = {}
        self._batches: dict[int, dict] = {}  # hypatia-ctl tune requests and their progress
        self._batch_ids = itertools.count(1)
        self._peers: dict[bytes, None] = {}
        self._runs: dict[int, tuple[bytes, int]] = {}  # remote-mode runs on the worker pool, by flight id
        self._local = threading.local()

    # -- lifecycle ------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit status."""
        ensure_private_dir(self.config.runtime_dir)
        self.config.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = PidLock(self.config.lock_path)
        lock.acquire()  # raises AlreadyRunning, leaving the first daemon untouched
        try:
            if self.faults.fail_start:
                raise StartFailed("fault injected: fail_start")
            if self.faults.slow_start:
                time.sleep(self.faults.slow_start)
            self.faults.speak_protocol()
            return self._serve()
        finally:
            lock.release()

    def _serve(self) -> int:
        store = Store(self.config.store_location, retry_s=self.config.store_retry_s)
        self.service = PlanService(self.config, store)
        self.runs = RunService(store, self.service.stored)
        self.runs.tick(time.monotonic())  # segments of clients that died while no daemon ran
        ctx = zmq.Context()
        self.zap = ZapHandler(ctx, os.getuid(), self.config.keys_dir)
        self.zap.start()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ZAP_DOMAIN, DOMAIN)  # every connection is checked by the ZAP handler
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        results = ctx.socket(zmq.PULL)
        results.setsockopt(zmq.LINGER, 0)
        results.bind(RESULTS_ENDPOINT)
        self.ctx, self.router, self.results = ctx, router, results
        # Replies go back through the socket a request came in on: identities carry its tag.
        self.sockets = {LOCAL: router}
        if self.config.listen:  # before the ipc bind: a listener that cannot start stops the daemon here
            self.sockets[TCP] = self._tcp_listener(ctx)
        sock = self.config.socket_path
        if sock.exists() or sock.is_symlink():
            sock.unlink()  # stale: we hold the lock, so no live daemon owns it
        old_umask = os.umask(0o077)
        try:
            router.bind(self.config.endpoint)
        finally:
            os.umask(old_umask)
        os.chmod(sock, 0o600)
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="hypatiad-plan")
        self.pool = pool
        self.tuner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hypatiad-tune")
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        log.info("hypatiad %s serving %s (pid %d, store %s)", __version__, self.config.endpoint, os.getpid(), store.location)
        sd_notify(f"READY=1\nSTATUS=serving {self.config.endpoint}\nMAINPID={os.getpid()}")
        try:
            self._loop()
        finally:
            sd_notify("STOPPING=1")
            for s, handler in previous.items():
                signal.signal(s, handler)
            pool.shutdown(wait=True, cancel_futures=True)
            self.tuner.shutdown(wait=True, cancel_futures=True)
            self.zap.stop()
            ctx.destroy(linger=500)  # let the last drained replies leave
            store.close()
            try:
                sock.unlink()
            except FileNotFoundError:
                pass
            log.info("hypatiad stopped")
        return 0

    def _tcp_listener(self, ctx: zmq.Context) -> zmq.Socket:
        """The optional listener for remote clients: CURVE-encrypted, admitted keys only."""
        try:
            public, secret = server_keys(self.config.keys_dir)
        except KeysError as exc:
            raise ConfigError(f"HYPATIA_LISTEN={self.config.listen} is set, but {exc}") from None
        tcp = ctx.socket(zmq.ROUTER)
        tcp.setsockopt(zmq.LINGER, 0)
        tcp.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        tcp.setsockopt(zmq.ROUTER_HANDOVER, 1)
        tcp.curve_server = True
        tcp.curve_secretkey = secret
        tcp.curve_publickey = public
        tcp.setsockopt(zmq.ZAP_DOMAIN, TCP_DOMAIN)
        try:
            tcp.bind(self.config.listen)
        except zmq.ZMQError as exc:
            tcp.close(linger=0)
            raise ConfigError(f"HYPATIA_LISTEN={self.config.listen}: cannot listen there ({exc})") from None
        log.info("listening for CURVE clients on %s (server key %s)", self.config.listen, public.decode())
        return tcp

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            log.info("received %s: draining %d flight(s)", signal.Signals(signum).name, len(self._flights))
        self.stopping = True

    # -- loop -----------------------------------------------------------------------------
    def _status(self) -> str:
        c = self.service.counters
        return (f"STATUS=serving {self.config.endpoint}: {c['plan_hits']} hits, {c['plan_misses']} misses, "
                f"{c['plans_made']} plans made, {c['tunings']} tunings, {len(self._flights)} planning, "
                f"{len(self._tuning)} tuning")

    def _heartbeat(self, now: float) -> None:
        """Watchdog pings and status for systemd; the idle timeout."""
        if self._watchdog and now >= self._next_ping:
            sd_notify("WATCHDOG=1")
            self._next_ping = now + self._watchdog
        if now >= self._next_status:
            sd_notify(self._status())
            self._next_status = now + STATUS_EVERY_S
        self.runs.tick(now)
        idle = self.config.idle_timeout_s
        busy = self._flights or self._tuning or self._runs
        if idle and not self.stopping and not busy and now - self._last_request > idle:
            log.info("no request for %d s (HYPATIA_IDLE_TIMEOUT_S): exiting", idle)
            sd_notify(f"STATUS=idle for {idle} s, exiting")
            self.stopping = True

    def _loop(self) -> None:
        poller = zmq.Poller()
        for sock in self.sockets.values():
            poller.register(sock, zmq.POLLIN)
        poller.register(self.results, zmq.POLLIN)
        drain_deadline = None
        self._watchdog = watchdog_interval()
        self._next_ping = self._next_status = self._last_request = time.monotonic()
        while True:
            self._heartbeat(time.monotonic())
            if self.stopping:
                if not self._flights and not any(self._tuning.values()) and not self._runs:
                    return
                drain_deadline = drain_deadline or time.monotonic() + DRAIN_TIMEOUT_S
                if time.monotonic() > drain_deadline:
                    log.error("drain timed out with %d flight(s) unanswered", len(self._flights))
                    return
            try:
                events = dict(poller.poll(100))
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EINTR:
                    continue
                raise
            if self.results in events:
                self._collect_results()
            for tag, sock in self.sockets.items():
                if sock not in events:
                    continue
                for _ in range(256):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    self._dispatch([tag + frames[0], *frames[1:]])

    def _send(self, identity: bytes, payload: bytes) -> None:
        try:
            self.sockets[identity[:1]].send_multipart([identity[1:], payload], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone or its queue full: it will retry
            log.debug("reply dropped: %s", exc)

    def _error(self, identity: bytes, request_id: int | None, code: ErrorCode, message: str) -> None:
        self.service.errors[code.name] += 1
        self._send(identity, encode_error(request_id, code, message))

    def _log_refusal(self, exc: ProtocolError) -> None:
        """Log a peer refused for its protocol version: the 1st, 2nd, 4th, 8th... refusal, so
        that a skewed client shows up in the log and a flood of them cannot fill it."""
        n = self.service.errors[ErrorCode.VERSION_MISMATCH.name]
        if n & (n - 1) == 0:
            log.warning("refused a peer at the handshake (%d refusal(s) so far): %s", n, exc)

    def _dispatch(self, frames: list[bytes]) -> None:
        self._last_request = time.monotonic()
        identity, payload = frames[0], frames[1:]
        if len(payload) != 1:
            self._error(identity, None, ErrorCode.BAD_FRAME, "expected exactly one frame per message")
            return
        try:
            request = decode_request(payload[0], self.config.max_message_bytes)
        except ProtocolError as exc:
            self._error(identity, exc.request_id, exc.code, str(exc))
            if exc.code == ErrorCode.VERSION_MISMATCH:
                self._log_refusal(exc)
            return
        method, rid, body = request.method, request.request_id, request.body
        self.service.requests[method] += 1
        if self.stopping:
            self._error(identity, rid, ErrorCode.SHUTTING_DOWN, "hypatiad is shutting down; retry or plan locally")
            return
        if method != "hello" and identity not in self._peers:
            self._error(identity, rid, ErrorCode.NOT_HANDSHAKEN, "send hello before any other request")
            return
        if not self.faults.on_request(method):
            return
        try:
            if method == "hello":
                result = self.service.hello(body, rid)
                self._peers[identity] = None
                if len(self._peers) > MAX_HANDSHAKEN_PEERS:
                    self._peers.pop(next(iter(self._peers)))
            elif method == "ping":
                result = {"pid": os.getpid()}
            elif method == "get_plan":
                result = self.service.get_plan(body, rid)
                policy = request_policy(body, rid)
                if self.service.wants_tuning(result["plan"], policy):
                    self._tune(plan_keys(body, rid), None)
            elif method == "report":
                result = self.service.report(body, rid)
            elif method == "stats":
                result = self.service.stats(inflight=len(self._flights), tuning=len(self._tuning))
                result["peers"] = {k: self.zap.counters[k] for k in ZAP_COUNTERS}
                result["listen"] = self.config.listen or None
                result |= self.runs.stats()
            elif method == "make_plan":
                self._start_flight(identity, rid, body)
                return
            elif method == "run":
                if identity[:1] == TCP:  # its segment names would name this host's memory, not the peer's
                    raise BadRequest("remote mode passes tensors through this host's shared memory: a client "
                                        "on another host (HYPATIA_CONNECT) runs its graphs itself", rid)
                job = self.runs.parse(body, rid)
                flight = next(self._flight_ids)
                self._runs[flight] = (identity, rid)
                self.pool.submit(self._run, ["run", flight], self.runs.run, job)
                return
            elif method == "tune":
                result = self._tune_batch(body, rid)
            elif method == "tune_status":
                result = self._batch_status(body, rid)
            elif method == "flush":
                if self._flights or self._tuning:
                    raise Busy(f"{len(self._flights)} planning and {len(self._tuning)} tuning job(s) in flight; "
                               "retry when `hypatia-ctl stats` shows none", rid)
                result = self.service.flush()
            else:  # decode_request only lets known methods through
                raise ProtocolError(f"no handler for {method}", rid)
        except ProtocolError as exc:
            self._error(identity, rid, exc.code, str(exc))
            if exc.code == ErrorCode.VERSION_MISMATCH:
                self._log_refusal(exc)
            return
        except StoreError as exc:  # the store's own words say what is wrong: no traceback
            log.error("handler %s failed: %s", method, exc)
            self._error(identity, rid, ErrorCode.INTERNAL, str(exc))
            return
        except Exception as exc:
            log.exception("handler %s failed", method)
            self._error(identity, rid, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        self._send(identity, encode_reply(rid, result))

    # -- flights (single-flight planning) -------------------------------------------------
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
            return
        waiters = self._flights.get((keys, policy))
        if waiters is not None:
            self.service.counters["coalesced"] += 1
            waiters.append((identity, rid))
            return
        self._plan_flight(keys, policy, job, [(identity, rid)])

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
            quiet = skipped or isinstance(exc, StoreError)  # a store error says all there is to say
            (log.warning if skipped else log.error if quiet else log.exception)(
                "%s %s failed: %s", tag[0], str(tag[1])[:40], exc)
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
                    self._send(identity, encode_reply(rid, {"plan": payload if ok else fallback}))
                else:
                    self._error(identity, rid, ErrorCode.INTERNAL, f"{kind} failed: {payload['error']}")

    def _finish_run(self, flight: int, ok: bool, outcome: dict) -> None:
        """A worker finished a remote-mode run: count it and answer its client."""
        identity, rid = self._runs.pop(flight)
        if not ok:  # the run raised past its own handler
            outcome = {"ok": False, "code": int(ErrorCode.INTERNAL), "message": outcome["error"]}
        self.runs.finished(outcome)
        if outcome["ok"]:
            self._send(identity, encode_reply(rid, {"outputs": outcome["outputs"]}))
        elif not outcome.get("abandoned"):  # an abandoned run has nobody waiting for it
            self._error(identity, rid, ErrorCode(outcome.get("code", ErrorCode.INTERNAL)),
                        outcome.get("message", "the client gave up on this run"))

    # -- hypatia-ctl tune -------------------------------------------------------------------
    def _tune_batch(self, body: dict, rid: int) -> dict:
        """Queue every untuned plan (whose graph key starts with ``graph_key``, if given)."""
        prefix = body.get("graph_key", "")
        if not isinstance(prefix, str):
            raise BadRequest("graph_key must be a string (a key or its prefix)", rid)
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
        batch = self._batches.get(body.get("batch"))
        if batch is None:
            raise BadRequest(f"no tuning batch {body.get('batch')!r} (the daemon restarted, or it is too old)", rid)
        return {k: (len(v) if isinstance(v, set) else v) for k, v in batch.items()}
