"""The control API behind ``hypatiad`` and ``hypatia-ctl``: start, stop, status, stats.

The command-line shells only parse arguments and print; tests call these functions directly.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from hypatia.client.rpc import DaemonClient, DaemonUnavailable
from hypatia.config import Config, ensure_private_dir, read_daemon_pid
from hypatia.daemon.lock import AlreadyRunning
from hypatia.daemon.server import Server, StartFailed
from hypatia.planner.store import Store, StoreError

EXIT_ALREADY_RUNNING = 75


class NotRunning(Exception):
    """No hypatiad is running for this runtime directory."""


def configure_logging(config: Config, to_stderr: bool) -> None:
    handlers: list[logging.Handler] = [logging.FileHandler(config.log_path)]
    if to_stderr:
        handlers.append(logging.StreamHandler())
    logging.basicConfig(
        level=getattr(logging, config.log_level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        handlers=handlers,
        force=True,
    )


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
    except DaemonUnavailable:
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
            raise AlreadyRunning(read_daemon_pid(config), config.lock_path)
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


def stop(config: Config, timeout_s: float = 30.0) -> int:
    """SIGTERM the daemon, wait for it to drain and exit; returns its pid."""
    pid = read_daemon_pid(config)
    if pid is None:
        raise NotRunning(f"no hypatiad is running for {config.endpoint}")
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
        "store": str(config.store_path),
        "log": str(config.log_path),
    }


def stats(config: Config) -> dict[str, Any]:
    """Counters from the running daemon, or what the store holds (read-only) when it is down."""
    if read_daemon_pid(config) is not None:
        client = DaemonClient(config, timeout_ms=max(config.timeout_ms, 2000), retries=1)
        try:
            return {"running": True} | client.call("stats")
        except DaemonUnavailable:
            pass
        finally:
            client.close()
    result: dict[str, Any] = {"running": False, "socket": config.endpoint, "store": {"path": str(config.store_path)}}
    try:
        store = Store(config.store_path, readonly=True)
    except StoreError as exc:
        return result | {"note": str(exc)}
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
    finally:
        store.close()
    return result
