"""Shared fixtures: an isolated HYPATIA_HOME per test and a real hypatiad subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

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


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@contextlib.contextmanager
def daemon_of_its_own_home(**settings: str) -> Iterator[Config]:
    """A real hypatiad in a fresh HYPATIA_HOME (no HYPATIA_* of this process, background tuning
    off, plus ``settings``), for a module's tests; stopped when the block ends."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPATIA_")}
    env |= {"HYPATIA_HOME": tempfile.mkdtemp(prefix="hy-", dir="/tmp"), "HYPATIA_BACKGROUND_TUNING": "0"} | settings
    config = load(env)
    subprocess.run([sys.executable, "-m", "hypatia.daemon", "start"], env=env, check=True, capture_output=True, timeout=120)
    try:
        yield config
    finally:
        pid = read_daemon_pid(config)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            assert wait_until(lambda: read_daemon_pid(config) is None, timeout=60), "a module's daemon did not stop"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at this moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemon_stats(config: Config) -> dict:
    """The daemon's stats, asked from this process (cheaper than a hypatia-ctl process per poll)."""
    from hypatia.client.rpc import DaemonClient

    client = DaemonClient(config, timeout_ms=30_000, retries=0)
    try:
        return client.call("stats")
    finally:
        client.close()


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
    # Graphs run under the aten executor unless a test asks for another: Inductor's C++ compile
    # takes seconds per graph on a CI machine; the executor tests use it and measure the choice.
    env |= {"HYPATIA_HOME": str(path), "PYTHONUNBUFFERED": "1", "HYPATIA_EXECUTOR": "aten"}
    for key in [k for k in os.environ if k.startswith("HYPATIA_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HYPATIA_HOME", str(path))
    monkeypatch.setenv("HYPATIA_EXECUTOR", "aten")
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


# Modules whose tests check that no shared-memory segment of this user is left behind: they run
# one after another on one worker when the suite runs on several (pytest-xdist), so that one's
# segments in flight are never another's leftovers.
SHARED_MEMORY_MODULES = {"test_remote", "test_device_requests", "test_shm", "test_device"}


def pytest_itemcollected(item):
    """Under ``--dist loadgroup`` each module's tests stay together on one worker (its module
    fixtures, a daemon most often, are made once), and the shared-memory modules share one."""
    if item.config.pluginmanager.hasplugin("xdist"):
        module = item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else item.nodeid
        item.add_marker(pytest.mark.xdist_group("shared-memory" if module in SHARED_MEMORY_MODULES else module))


@pytest.hookimpl(trylast=True)  # after -m has deselected what will not run
def pytest_collection_modifyitems(config, items):
    """GPU tests run on a machine with CUDA; selecting them elsewhere is an error, not a skip."""
    if any(item.get_closest_marker("gpu") for item in items):
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("tests marked gpu were selected but no CUDA device is available; use -m 'not gpu'")


# -- PostgreSQL ------------------------------------------------------------------------------
# The store's PostgreSQL tests use the server named by HYPATIA_TEST_POSTGRES (default: the one on
# 127.0.0.1:5432 with trust auth), else a throwaway server started from local binaries (initdb +
# pg_ctl in a temporary directory), else they skip, saying why. HYPATIA_REQUIRE_POSTGRES=1 (set by
# .ci/run) turns that skip into a failure, so CI cannot pass without having run them. Both are read
# at import, before any test's fixtures clear the HYPATIA_* variables.
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
TEST_POSTGRES = os.environ.get("HYPATIA_TEST_POSTGRES", DEFAULT_POSTGRES)
REQUIRE_POSTGRES = os.environ.get("HYPATIA_REQUIRE_POSTGRES") == "1"


def _postgres_answers(url: str) -> str | None:
    """None if ``url`` accepts a connection, else why not."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install -e '.[test]')"
    try:
        psycopg.connect(url, connect_timeout=3, autocommit=True).close()
        return None
    except psycopg.Error as exc:
        return f"{url}: {str(exc).strip().splitlines()[0]}"


def _postgres_binaries() -> Path | None:
    import glob
    import shutil

    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


class ThrowawayPostgres:
    """A PostgreSQL server in a temporary directory, listening on 127.0.0.1 at a free port.

    initdb refuses to run as root, so as root the cluster belongs to ``nobody``."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="hy-pg-"))
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_user: list[str] = []
        if os.getuid() == 0:
            os.chown(self.dir, 65534, 65534)
            self._as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

    def _run(self, *argv: str) -> None:
        proc = subprocess.run([*self._as_user, *argv], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")

    def start(self) -> None:
        data = self.dir / "data"
        self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "log"), "-w", "-t", "60", "start",
                  "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off")

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """A URL of a PostgreSQL server that tests may create databases on."""
    url = TEST_POSTGRES
    why = _postgres_answers(url)
    throwaway = None
    if why is not None:
        bindir = _postgres_binaries()
        if bindir is None:
            why += "; and no initdb was found for a throwaway server"
        else:
            throwaway = ThrowawayPostgres(bindir)
            try:
                throwaway.start()
                url, why = throwaway.url, _postgres_answers(throwaway.url)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                why += f"; a throwaway server from {bindir} did not start: {exc}"
    if why is not None:
        if REQUIRE_POSTGRES:
            pytest.fail(f"HYPATIA_REQUIRE_POSTGRES=1 but no PostgreSQL server: {why}", pytrace=False)
        pytest.skip(f"no PostgreSQL server: {why}")
    yield url
    if throwaway is not None:
        throwaway.stop()


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh database on the test server (dropped afterwards), as a ``postgresql://`` URL."""
    import uuid

    import psycopg

    name = f"hy_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield _with_database(postgres_server, name)
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request, tmp_path):
    """Where a store test's store lives: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "s.sqlite"
    return request.getfixturevalue("postgres_url")
