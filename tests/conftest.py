"""Shared fixtures: an isolated HYPATIA_HOME per test and a real hypatiad subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hypatia.config import Config, load, read_daemon_pid


@dataclass
class Home:
    path: Path
    env: dict
    config: Config

    def run(self, *argv: str, check: bool = True, timeout: float = 60, extra_env: dict | None = None) -> subprocess.CompletedProcess:
        """Run ``python -m <argv>`` (or a console script module) with this home's environment."""
        env = self.env | (extra_env or {})
        proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def hypatiad(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("-m", "hypatia.daemon", *args, **kw)

    def ctl(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("-m", "hypatia.daemon.ctl", *args, **kw)

    def stats(self) -> dict:
        return json.loads(self.ctl("stats", "--json").stdout)

    def python(self, code: str, timeout: float = 120, extra_env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Python snippet in a fresh process with this home's environment."""
        return self.run("-c", textwrap.dedent(code), timeout=timeout, extra_env=extra_env, check=check)

    def daemon_pid(self) -> int | None:
        return read_daemon_pid(self.config)


def _kill_daemon(config: Config) -> None:
    pid = read_daemon_pid(config)
    if pid is None:
        return
    for sig, wait in ((signal.SIGCONT, 0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if read_daemon_pid(config) is None:
                return
            time.sleep(0.05)


@pytest.fixture
def home(monkeypatch) -> Home:
    """A fresh, short HYPATIA_HOME (ipc paths are limited to 107 bytes); daemons in it are
    stopped afterwards. Tests that start a client in this process get their own session."""
    path = Path(tempfile.mkdtemp(prefix="hy-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPATIA_")}
    env |= {"HYPATIA_HOME": str(path), "PYTHONUNBUFFERED": "1"}
    for key in [k for k in os.environ if k.startswith("HYPATIA_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HYPATIA_HOME", str(path))
    from hypatia.client.backend import reset_session

    reset_session()
    h = Home(path, env, load(env))
    yield h
    reset_session()
    _kill_daemon(h.config)


@pytest.fixture
def daemon(home: Home) -> Home:
    """``home`` with a real hypatiad started the way a user starts it."""
    proc = home.hypatiad("start")
    assert "started" in proc.stdout
    assert home.daemon_pid() is not None
    return home


@pytest.fixture
def dynamo_reset():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.hookimpl(trylast=True)  # after -m has deselected what will not run
def pytest_collection_modifyitems(config, items):
    """GPU tests run on a machine with CUDA; selecting them elsewhere is an error, not a skip."""
    if any(item.get_closest_marker("gpu") for item in items):
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("tests marked gpu were selected but no CUDA device is available; use -m 'not gpu'")
