"""Start hypatiad on demand, as sccache does: race-safe across processes.

An flock on ``autostart.lock`` lets one process at a time try; the daemon's own lock decides
who serves, so racing processes always end up sharing one daemon.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import time

from hypatia.config import Config, ensure_private_dir, read_daemon_pid

log = logging.getLogger("hypatia.client")


class AutostartFailed(Exception):
    """The daemon could not be started; the message carries what it printed."""


def ensure_daemon(config: Config) -> int:
    """The pid of a running daemon, starting one if none runs; raises :class:`AutostartFailed`."""
    pid = read_daemon_pid(config)
    if pid is not None:
        return pid
    ensure_private_dir(config.runtime_dir)
    fd = os.open(config.autostart_lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + config.start_timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AutostartFailed("another process has been starting hypatiad for too long") from None
                time.sleep(0.02)
        pid = read_daemon_pid(config)
        if pid is not None:
            return pid
        log.info("no hypatiad running for %s; starting one", config.endpoint)
        env = dict(os.environ)
        # The daemon must not inherit the caller's GPU selection or distributed settings.
        for name in ("CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
        proc = subprocess.run(
            [sys.executable, "-m", "hypatia.daemon", "start"],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=config.start_timeout_s + 5,
        )
        pid = read_daemon_pid(config)
        if pid is None:
            raise AutostartFailed(
                f"`hypatiad start` exited with {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        return pid
    except subprocess.TimeoutExpired as exc:
        raise AutostartFailed(f"`hypatiad start` did not return in time: {exc}") from None
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
