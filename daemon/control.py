"""The control API behind ``hypatiad`` and ``hypatia-ctl``: start, stop, status, stats, plans,
tune and flush.

The command-line shells only parse arguments and print; tests call these functions directly.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable

from hypatia.client.rpc import DaemonClient, DaemonUnavailable, VersionSkew
from hypatia.config import Config, ensure_private_dir, read_daemon_pid
from hypatia.daemon.lock import AlreadyRunning, PidLock, StoreLocked, read_holder, store_lock_path
from hypatia.daemon.logs import configure_logging
from hypatia.daemon.server import Server, StartFailed
from hypatia.keys import admit_client, admitted, ensure_server_keys, revoke_client
from hypatia.planner.plan import PlanFormatError
from hypatia.planner.store import Store, StoreError, UnreadableStore
from hypatia.protocol import ErrorCode, RemoteError

EXIT_ALREADY_RUNNING = 75


class NotRunning(Exception):
    """No hypatiad is running for this runtime directory."""


def run_foreground(config: Config, detached: bool = False) -> int:
    """Serve in this process until stopped (``hypatiad start --foreground``)."""
    ensure_private_dir(config.runtime_dir)
    config.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    configure_logging(config, to_stderr=not detached)
    try:
        return Server(config).run()
    except AlreadyRunning as exc:
        logging.getLogger("hypatia.daemon").error("%s", exc)
        return EXIT_ALREADY_RUNNING


def _tail(path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def ping(config: Config, timeout_ms: int = 300) -> dict | None:
    """The daemon's hello answer, or None if it does not answer in time."""
    client = DaemonClient(config, timeout_ms=timeout_ms, retries=0)
    try:
        client.call("ping")
        return client.server
    except (DaemonUnavailable, VersionSkew):
        return None
    finally:
        client.close()


def start(config: Config) -> int:
    """Start a detached daemon and wait until it answers; returns its pid."""
    pid = read_daemon_pid(config)
    if pid is not None:
        raise AlreadyRunning(pid, config.lock_path)
    ensure_private_dir(config.runtime_dir)
    config.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(config.log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hypatia.daemon", "start", "--foreground", "--detached"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + config.start_timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code == EXIT_ALREADY_RUNNING:
            raise _refusal(config)
        if code is not None:
            raise StartFailed(f"hypatiad exited with status {code} while starting; log {config.log_path}:\n{_tail(config.log_path)}")
        if read_daemon_pid(config) == proc.pid and ping(config) is not None:
            return proc.pid
        time.sleep(0.05)
    # Do not leave a daemon behind that we reported as failed: it would hold the lock.
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    raise StartFailed(
        f"hypatiad (pid {proc.pid}) did not answer within {config.start_timeout_s} s "
        f"(HYPATIA_START_TIMEOUT_S); log {config.log_path}:\n{_tail(config.log_path)}"
    )


def _refusal(config: Config) -> AlreadyRunning:
    """Why a daemon just started refused to serve: another holds this runtime directory, or
    (from another runtime directory) this SQLite store."""
    pid = read_daemon_pid(config)
    path = store_lock_path(config)
    if pid is None and path is not None:
        holder, endpoint = read_holder(path)
        if holder is not None:
            return StoreLocked(holder, path, config.store_path, endpoint)
    return AlreadyRunning(pid, config.lock_path)


# `hypatiad stop` waits for the daemon's drain (HYPATIA_DRAIN_TIMEOUT_S) and this much longer,
# for the workers to be killed and the store closed.
STOP_MARGIN_S = 10.0


def stop(config: Config, timeout_s: float | None = None) -> int:
    """SIGTERM the daemon, wait for it to drain and exit; returns its pid. The wait is the
    daemon's own drain timeout plus a margin, so a daemon that stops on time is never reported
    as hung."""
    pid = read_daemon_pid(config)
    if pid is None:
        raise NotRunning(f"no hypatiad is running for {config.endpoint}")
    if timeout_s is None:
        timeout_s = config.drain_timeout_s + STOP_MARGIN_S
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if read_daemon_pid(config) is None:
            return pid
        time.sleep(0.05)
    raise TimeoutError(f"hypatiad (pid {pid}) did not exit within {timeout_s:.0f} s; `kill -9 {pid}` if it is hung")


def status(config: Config) -> dict[str, Any]:
    pid = read_daemon_pid(config)
    answer = ping(config, timeout_ms=1000) if pid else None
    return {
        "running": pid is not None,
        "responding": answer is not None,
        "pid": pid,
        "version": (answer or {}).get("version"),
        "socket": config.endpoint,
        "store": config.store_shown,
        "log": str(config.log_path),
    }


def stats(config: Config) -> dict[str, Any]:
    """Counters from the running daemon, or what the store holds (read-only) when it is down."""
    result: dict[str, Any] = {"running": False, "socket": config.endpoint, "store": {"path": config.store_shown}}
    if read_daemon_pid(config) is not None:
        client = DaemonClient(config, timeout_ms=max(config.timeout_ms, 2000), retries=1)
        try:
            return {"running": True} | client.call("stats")
        except DaemonUnavailable:
            pass
        except VersionSkew as exc:  # it runs, but cannot be asked: say why beside what the store holds
            result["note"] = str(exc)
        finally:
            client.close()
    try:
        store = Store(config.store_location, readonly=True)
    except UnreadableStore:
        raise  # a damaged store is an error to report, not a note
    except StoreError as exc:
        return result | {"note": "; ".join(filter(None, (result.get("note"), str(exc))))}
    try:
        counts = store.counts()
        result["store"]["size_bytes"] = store.size_bytes()
        result.update(
            graphs=counts["canonical_graphs"],
            workloads=counts["workloads"],
            environments=counts["environments"],
            implementations=counts["implementations"],
            plans=counts["plans"],
        )
        count, size = store.artifact_totals()
        result["artifacts"] = {"count": count, "bytes": size}
    finally:
        store.close()
    return result


class NoSuchPlan(LookupError):
    """No stored plan matches the key (or prefix) given, or more than one does."""


def _read_store(config: Config) -> Store:
    return Store(config.store_location, readonly=True)


def plans(config: Config) -> list[dict]:
    """A summary of every stored plan, newest first (read-only; the daemon may be running)."""
    store = _read_store(config)
    try:
        return store.plan_rows()
    finally:
        store.close()


def plan(config: Config, key: str) -> dict:
    """One stored plan, by its graph key or a unique prefix of it: its summary and recipe."""
    if not key:
        raise NoSuchPlan("give a graph key (or a prefix of one) as `hypatia-ctl plans` lists them")
    store = _read_store(config)
    try:
        rows = [r for r in store.plan_rows() if r["graph_key"].startswith(key)]
        if not rows:
            raise NoSuchPlan(f"no stored plan has a graph key starting with {key!r}; `hypatia-ctl plans` lists them")
        if len({(r["graph_key"], r["workload_key"], r["env_key"]) for r in rows}) > 1:
            listed = ", ".join(f"{r['graph_key'][:20]} ({r['workload_key'][:12]})" for r in rows[:5])
            raise NoSuchPlan(f"{len(rows)} plans match {key!r}: {listed}; give more of the key")
        row = rows[0]
        keys = (row["graph_key"], row["workload_key"], row["env_key"])
        stored = store.get_plan(keys)
        if stored is None:
            raise NoSuchPlan(f"the plan for {key!r} failed verification; the daemon re-plans it on next use")
        return row | {"recipe": stored.to_recipe()}
    except PlanFormatError as exc:
        raise NoSuchPlan(f"the plan for {key!r} cannot be read: {exc}") from None
    finally:
        store.close()


def _daemon(config: Config, timeout_ms: int = 5000) -> DaemonClient:
    if read_daemon_pid(config) is None:
        start(config)
    return DaemonClient(config, timeout_ms=timeout_ms, retries=1)


def tune(config: Config, graph_key: str = "", progress: Callable[[dict], None] | None = None,
         poll_s: float = 0.2) -> dict:
    """Have the daemon (started if needed) tune every untuned plan, or those whose graph key
    starts with ``graph_key``; ``progress`` is called with each status until all are done.
    Raises :class:`NoSuchPlan` when ``graph_key`` matches no stored plan."""
    if graph_key:
        try:
            matched = any(r["graph_key"].startswith(graph_key) for r in plans(config))
        except StoreError:
            matched = False
        if not matched:
            raise NoSuchPlan(f"no stored plan has a graph key starting with {graph_key!r}; "
                             "`hypatia-ctl plans` lists them")
    client = _daemon(config)
    try:
        batch = client.call("tune", {"graph_key": graph_key})
        status = {"total": batch["queued"], "pending": batch["queued"], "done": 0, "failed": 0, "skipped": 0,
                  "untunable": batch.get("untunable", 0)}
        while True:
            if progress is not None:
                progress(status)
            if status["pending"] == 0:
                return status
            time.sleep(poll_s)
            status = client.call("tune_status", {"batch": batch["batch"]})
    finally:
        client.close()


def flush(config: Config, artifacts_only: bool = False) -> dict[str, int]:
    """Empty the plan cache (``artifacts_only``: only its compiled artifacts): through the daemon
    when it runs, else by removing the store file (or, for a shared PostgreSQL store or the
    artifacts alone, its rows). Returns the number of rows per table deleted."""
    if read_daemon_pid(config) is not None:
        client = DaemonClient(config, timeout_ms=max(config.timeout_ms, 10_000), retries=0)
        try:
            return client.call("flush", {"what": "artifacts"} if artifacts_only else {})["deleted"]
        except RemoteError as exc:
            if exc.code == ErrorCode.BUSY:
                raise TimeoutError(f"the daemon is busy: {exc.remote_message}") from None
            raise
        finally:
            client.close()
    ensure_private_dir(config.runtime_dir)
    lock = PidLock(config.lock_path)
    lock.acquire()  # no daemon starts on the file while it goes (AlreadyRunning if one just did)
    path = store_lock_path(config)
    store_lock = PidLock(path) if path is not None and config.cache_dir.is_dir() else None
    if store_lock is not None and not store_lock.try_acquire():  # a daemon of another runtime directory
        holder, endpoint = read_holder(path)
        lock.release()
        raise StoreLocked(holder, path, config.store_path, endpoint)
    try:
        if config.store_url or artifacts_only:
            if not config.store_url and not config.store_path.exists():
                return {}
            store = Store(config.store_location)
            try:
                return {"artifacts": store.flush_artifacts()} if artifacts_only else store.flush()
            finally:
                store.close()
        try:
            store = _read_store(config)
            counts = store.counts()
            store.close()
        except StoreError:
            counts = {}
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(str(config.store_path) + suffix)
            except FileNotFoundError:
                pass
        return counts
    finally:
        if store_lock is not None:
            store_lock.release()
        lock.release()


def keys(config: Config, admit: str | None = None, revoke: str | None = None) -> str:
    """Create the daemon's CURVE key pair if needed, admit or revoke a client, and describe the
    result for people."""
    public, _ = ensure_server_keys(config.keys_dir)
    lines = []
    if admit:
        bundle = admit_client(config.keys_dir, admit)
        lines += [f"admitted client {admit!r}; copy {bundle} to its machine (keep it private) and set there:",
                  "  HYPATIA_CONNECT=tcp://<this host>:<port>  HYPATIA_CLIENT_KEYS=<path of the copy>", ""]
    if revoke:
        revoke_client(config.keys_dir, revoke)
        lines += [f"revoked client {revoke!r}: its next connection is refused", ""]
    clients = sorted(admitted(config.keys_dir).values())
    lines += [f"server public key: {public.decode()}",
              f"keys directory:    {config.keys_dir}",
              f"admitted clients:  {', '.join(clients) if clients else 'none (hypatia-ctl keys --client NAME)'}",
              f"TCP listener:      {config.listen or 'off (set HYPATIA_LISTEN=tcp://ADDRESS:PORT for hypatiad)'}"]
    return "\n".join(lines)
