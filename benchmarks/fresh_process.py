"""Running a measurement in a fresh Python process, and the daemons those processes use.

Every first-call and multi-process measurement runs in an interpreter of its own so that nothing
(imports, Dynamo state, in-memory caches) carries over; its environment is the parent's without
the settings that would steer caches or the daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class ChildFailed(Exception):
    """A measuring subprocess exited badly, timed out or printed no JSON."""


def base_env() -> dict:
    """The parent's environment without settings that would steer caches or the daemon."""
    drop = ("HYPATIA_", "TORCHINDUCTOR_", "TRITON_", "TORCH_COMPILE_")
    # the client's patience is kept: a --quick run waits for the daemon however busy the machine
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) or k == "HYPATIA_TIMEOUT_MS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def run_child(code: str, params: dict, env: dict, timeout: float) -> dict:
    """Run ``code`` in a fresh interpreter and return its last stdout line as JSON, plus its wall time."""
    start = time.perf_counter()
    # A session of its own, so a timeout also ends the compile workers it forked, which would
    # otherwise hold its pipes open (a daemon it autostarts lives in yet another session).
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(params)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise ChildFailed(f"timed out after {timeout:.0f} s; stderr: {stderr[-800:]}") from None
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise ChildFailed(f"exit {proc.returncode}: {stderr[-800:]}")
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise ChildFailed(f"no JSON line on stdout ({stdout[-200:]!r}); stderr: {stderr[-800:]}") from None
    return result | {"total_process_s": round(total, 3)}


def hypatiad(verb: str, home: Path) -> subprocess.CompletedProcess:
    """``hypatiad <verb>`` (start, stop) for the daemon of ``home``, output captured."""
    env = base_env() | {"HYPATIA_HOME": str(home)}
    # stop waits for the daemon's drain timeout (20 s by default) and then some
    return subprocess.run([sys.executable, "-m", "hypatia.daemon", verb], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def daemon_pid(home: Path) -> int | None:
    """The pid of the hypatiad serving ``home``, or None."""
    from hypatia.config import load, read_daemon_pid

    return read_daemon_pid(load({"HYPATIA_HOME": str(home)}))
