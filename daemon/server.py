"""hypatiad's server loop: a ZeroMQ ROUTER on the per-user ipc socket.

Cheap requests (hello, ping, get_plan, report, stats, tune_status, flush) are answered on this
thread; planning, tuning and hypatia-device requests go to :mod:`hypatia.daemon.jobs` (threads, and
worker processes under a deadline), whose results come back over an inproc PULL socket, so that
only this thread ever touches the ROUTER; :mod:`hypatia.daemon.flights` keeps who waits for
which job. SIGTERM stops intake and drains the flights in progress (queued background tunings
are dropped) for up to HYPATIA_DRAIN_TIMEOUT_S; then the clients still waiting are told the
daemon is shutting down, the workers are killed and the daemon exits.

A client whose make_plan waits on a planning flight is told so at once and then every
:data:`PROGRESS_EVERY_S` (a ``pending`` reply), so that it keeps waiting while this daemon is alive
and working, however loaded the host. The daemon holds its runtime lock and, for a SQLite store,
the store lock for its whole life, and checks every :data:`WATCH_EVERY_S` that its socket and its
lock file are still the ones it made: when they are removed or replaced (its runtime directory was
deleted) no new client can reach it, so it says so in the log, drains and exits, and the daemon
that a client starts next takes over the store once it is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import zmq

from hypatia import __version__, shm
from hypatia.config import Config, ConfigError, ensure_private_dir
from hypatia.daemon.compiles import Compiles
from hypatia.daemon.failures import FailureLog
from hypatia.daemon.faults import Faults
from hypatia.daemon.lock import PidLock, SocketWatch, acquire_store_lock
from hypatia.daemon.notify import sd_notify, watchdog_interval
from hypatia.daemon.device import DeviceService
from hypatia.daemon.executables import Executables
from hypatia.daemon.zap import COUNTERS as ZAP_COUNTERS, DOMAIN, TCP_DOMAIN, ZapHandler
from hypatia.keys import KeysError, server_keys
from hypatia.daemon.flights import Flights
from hypatia.daemon.jobs import RESULTS_ENDPOINT, Jobs
from hypatia.daemon.service import PlanService, plan_keys, request_policy
from hypatia.planner.store import Store, StoreError
from hypatia.protocol import (
    PROGRESS_EVERY_S,
    BadRequest,
    Busy,
    ErrorCode,
    ProtocolError,
    decode_request,
    encode_error,
    encode_reply,
)

log = logging.getLogger("hypatia.daemon")

STATUS_EVERY_S = 5.0  # how often STATUS= is refreshed for systemctl status
MAX_HANDSHAKEN_PEERS = 65536
WATCH_EVERY_S = 1.0  # how often the daemon checks that its socket and lock file are still its own
LOCAL, TCP = b"l", b"t"  # the first byte of a peer's identity inside the daemon: which socket it came in on


def flush_what(body: dict, request_id: int) -> str:
    """What a flush deletes: "all" (the default) or "artifacts" (the compiled code alone)."""
    what = body.get("what", "all")
    if what not in ("all", "artifacts"):
        raise BadRequest(f"flush what={str(what)[:40]!r}: give \"all\" or \"artifacts\"", request_id)
    return what


class StartFailed(Exception):
    """The daemon could not start serving; the message says why."""


class Server(Flights):
    def __init__(self, config: Config, workers: int = 2):
        self.config = config
        self.faults = Faults.parse(config.faults)
        self.workers = workers
        self.stopping = False
        self._peers: dict[bytes, None] = {}
        self.failures = FailureLog(log)
        self.daemon_id = shm.daemon_id(config.socket_path)
        self.watch: SocketWatch | None = None
        self._init_flights()

    # -- lifecycle ------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit status."""
        ensure_private_dir(self.config.runtime_dir)
        self.config.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = PidLock(self.config.lock_path)
        lock.acquire()  # raises AlreadyRunning, leaving the first daemon untouched
        store_lock = None
        try:
            # StoreLocked when another daemon serves this SQLite file; waits for one on its way out
            # (within `hypatiad start`'s own wait, so that it reports the refusal rather than a timeout)
            store_lock = acquire_store_lock(self.config, wait_s=0.8 * self.config.start_timeout_s)
            if self.faults.fail_start:
                raise StartFailed("fault injected: fail_start")
            if self.faults.slow_start:
                time.sleep(self.faults.slow_start)
            self.faults.speak_protocol()
            status = self._serve(lock)
        finally:
            if store_lock is not None:
                store_lock.release()
            lock.release()
        if self.jobs.stuck_threads:  # a thread nothing can interrupt must not hold the process past its drain
            logging.shutdown()
            os._exit(status)
        return status

    def _serve(self, lock: PidLock) -> int:
        store = Store(self.config.store_location, retry_s=self.config.store_retry_s)
        self.service = PlanService(self.config, store)
        self.compiles = Compiles(self.config, store)
        self.device = DeviceService(self.config, self.daemon_id, Executables(store, self.service.stored),
                                    self.config.device_memory_mb << 20, self.config.device_idle_s,
                                    self.service.record_executor)
        self.device.sweep_segments()  # those of clients that died while no daemon ran
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
        self.watch = SocketWatch(sock, lock)
        self.jobs = Jobs(self.config, ctx, self.workers, self.failures)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        log.info("hypatiad %s serving %s (pid %d, store %s)", __version__, self.config.endpoint, os.getpid(), store.location)
        sd_notify(f"READY=1\nSTATUS=serving {self.config.endpoint}\nMAINPID={os.getpid()}")
        try:
            self._loop()
        finally:
            sd_notify("STOPPING=1")
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.jobs.stop()  # what is still planning or tuning now is cancelled
            self.zap.stop()
            ctx.destroy(linger=500)  # let the last drained replies leave
            store.close()
            if self.watch.socket_ours():  # else the path is a new daemon's socket, or nothing
                sock.unlink()
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
        """Watchdog pings and status for systemd; progress to waiting clients; the socket watch;
        the idle timeout."""
        if now >= self._next_progress:
            self._next_progress = now + PROGRESS_EVERY_S
            self._progress()
        if now >= self._next_watch and not self.stopping:
            self._next_watch = now + WATCH_EVERY_S
            lost = self.watch.lost()
            if lost is not None:
                log.warning("%s: no new client can reach this daemon, so it drains and exits; the daemon "
                            "started next serves the store", lost)
                sd_notify(f"STATUS={lost}, exiting")
                self.stopping = True
        if self._watchdog and now >= self._next_ping:
            sd_notify("WATCHDOG=1")
            self._next_ping = now + self._watchdog
        if now >= self._next_status:
            sd_notify(self._status())
            self._next_status = now + STATUS_EVERY_S
        self.device.tick(now)
        if not self.service.store.writable:  # planning writes in worker processes: try here too
            self.service.store.probe()
        if not self.stopping:
            self.jobs.release_due(now)
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
        self._next_progress = self._next_watch = time.monotonic()
        while True:
            self._heartbeat(time.monotonic())
            if self.stopping:
                if not self._flights and not any(self._tuning.values()) and not self._runs:
                    return
                drain_deadline = drain_deadline or time.monotonic() + self.config.drain_timeout_s
                if time.monotonic() > drain_deadline:
                    log.error("drain timed out after %d s (HYPATIA_DRAIN_TIMEOUT_S) with %d flight(s) unanswered; "
                              "cancelling them", self.config.drain_timeout_s, len(self._flights))
                    self._cancel_waiters()
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

    def _error(self, identity: bytes, request_id: int | None, code: ErrorCode, message: str,
               method: str = "request", exc: BaseException | None = None, logged: bool = False) -> None:
        """Answer a failed request: counted, and logged in one rate-limited line (the refusals of
        another protocol version have their own line; ``logged`` when the cause was logged)."""
        self.service.errors[code.name] += 1
        if not logged and code != ErrorCode.VERSION_MISMATCH:
            level = (logging.ERROR if code == ErrorCode.INTERNAL else
                     logging.INFO if code in (ErrorCode.SHUTTING_DOWN, ErrorCode.NOT_HANDSHAKEN) else logging.WARNING)
            error, text = (code.name, message) if exc is None else (type(exc).__name__, str(exc))
            self.failures.failed(method, error, text, level, exc)
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
            self._error(identity, rid, ErrorCode.SHUTTING_DOWN, "hypatiad is shutting down; retry or plan locally", method)
            return
        if method != "hello" and identity not in self._peers:
            self._error(identity, rid, ErrorCode.NOT_HANDSHAKEN, "send hello before any other request", method)
            return
        try:
            if not self.faults.on_request(method):
                return
            if method == "hello":  # the daemon's id names the shared-memory segments of the device's transfers
                result = self.service.hello(body, rid) | {"daemon": self.daemon_id}
                self._peers[identity] = None
                if len(self._peers) > MAX_HANDSHAKEN_PEERS:
                    self._peers.pop(next(iter(self._peers)))
            elif method == "ping":
                result = {"pid": os.getpid()}
            elif method == "get_plan":
                result = self.service.get_plan(body, rid)
                policy = request_policy(body, rid)
                if self.service.wants_tuning(plan_keys(body, rid), result["plan"], policy):
                    self._tune(plan_keys(body, rid), None, delay=self.config.tune_delay_s)
            elif method == "report":
                result = self.service.report(body, rid)
                if "verdicts" in body or "executor" in body:  # its client is done compiling: tune now
                    self.jobs.release(plan_keys(body, rid))
            elif method == "stats":
                result = self.service.stats(inflight=len(self._flights), tuning=len(self._tuning))
                for section, values in self.jobs.stats().items():
                    result[section] |= values
                result["peers"] = {k: self.zap.counters[k] for k in ZAP_COUNTERS}
                result["listen"] = self.config.listen or None
                result["artifacts"] = self.compiles.stats()
                result |= self.device.stats()
            elif method == "make_plan":
                self._start_flight(identity, rid, body)
                return
            elif method == "device":  # the hypatia device: cheap ops here, the rest on the pool
                op, job = self.device.parse(body, rid, over_tcp=identity[:1] == TCP)
                if op in ("release", "close"):
                    result = self.device.answer_now(op, job)
                else:
                    flight = next(self._flight_ids)
                    self._runs[flight] = (identity, rid)
                    self.jobs.run(flight, self.device.work, job)
                    return
            elif method == "get_compiled":
                result = self.compiles.get(body, rid, over_tcp=identity[:1] == TCP)
            elif method == "put_compiled":
                result = self.compiles.put(body, rid, over_tcp=identity[:1] == TCP)
            elif method == "compile_heartbeat":
                result = self.compiles.heartbeat(body, rid, over_tcp=identity[:1] == TCP)
            elif method == "compile_release":
                result = self.compiles.release(body, rid, over_tcp=identity[:1] == TCP)
            elif method == "warm_start":
                result = self.compiles.warm_start(body, rid)
            elif method == "tune":
                result = self._tune_batch(body, rid)
            elif method == "tune_status":
                result = self._batch_status(body, rid)
            elif method == "flush" and flush_what(body, rid) == "artifacts":  # the compiled code alone
                result = {"deleted": {"artifacts": self.compiles.flush()}}
            elif method == "flush":
                running = len(self._tuning) - len(self.jobs.waiting())
                if self._flights or running:
                    raise Busy(f"{len(self._flights)} planning and {running} tuning job(s) in flight; "
                               "retry when `hypatia-ctl stats` shows none", rid)
                for keys in self.jobs.drop_waiting():  # not started: dropped with the plans they would tune
                    self._tuning.pop(keys, None)
                    self._tuning_jobs.pop(keys, None)
                self.compiles.claims.clear()
                result = self.service.flush()
            else:  # decode_request only lets known methods through
                raise ProtocolError(f"no handler for {method}", rid)
        except ProtocolError as exc:
            self._error(identity, rid, exc.code, str(exc), method)
            if exc.code == ErrorCode.VERSION_MISMATCH:
                self._log_refusal(exc)
            return
        except StoreError as exc:  # the store's own words say what is wrong: one line, no traceback
            self._error(identity, rid, ErrorCode.INTERNAL, str(exc), method, exc)
            return
        except Exception as exc:  # a handler's bug: one line in the log (its traceback at DEBUG)
            self._error(identity, rid, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", method, exc)
            return
        self._send(identity, encode_reply(rid, result))
