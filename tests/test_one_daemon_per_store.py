"""One daemon per store: a second daemon on a SQLite store (from another runtime directory) is
refused naming the first; a daemon whose runtime directory is removed leaves within seconds and
the daemon a client starts next takes over the store only once it is gone."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

from conftest import daemon_stats
from fault_helpers import daemons  # noqa: F401  (a fixture)
from hypatia.client.autostart import ensure_daemon
from hypatia.config import load, read_daemon_pid
from hypatia.daemon.lock import read_holder, store_lock_path


def _xdg_env(home, runtime: str) -> dict:
    """An environment without HYPATIA_HOME: the runtime directory ``runtime`` of the home, and
    the home's one cache directory (so one store) whatever ``runtime`` is."""
    env = {k: v for k, v in home.env.items() if k != "HYPATIA_HOME"}
    return env | {"XDG_RUNTIME_DIR": str(home.path / runtime), "XDG_CACHE_HOME": str(home.path / "c"),
                  "XDG_CONFIG_HOME": str(home.path / "k")}


def _hypatiad(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hypatia.daemon", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_second_daemon_on_the_same_store_is_refused_naming_the_first(home):
    first_env, second_env = _xdg_env(home, "ra"), _xdg_env(home, "rb")
    first, second = load(first_env), load(second_env)
    assert first.store_path == second.store_path and first.socket_path != second.socket_path
    assert _hypatiad(first_env, "start").returncode == 0
    pid = read_daemon_pid(first)
    try:
        assert read_holder(store_lock_path(first)) == (pid, first.endpoint)

        detached = _hypatiad(second_env, "start")
        assert detached.returncode == 1, detached.stderr
        assert f"the store {first.store_path} is in use by another hypatiad (pid {pid}, serving {first.endpoint}" \
            in detached.stderr
        foreground = _hypatiad(second_env, "start", "--foreground")
        assert foreground.returncode == 75 and f"pid {pid}" in foreground.stderr
        assert "Traceback" not in detached.stderr + foreground.stderr
        assert read_daemon_pid(second) is None

        flush = subprocess.run([sys.executable, "-m", "hypatia.daemon.ctl", "flush", "--yes"], env=second_env,
                               capture_output=True, text=True, timeout=60)
        assert flush.returncode != 0 and f"pid {pid}" in flush.stderr and "Traceback" not in flush.stderr

        assert daemon_stats(first)["pid"] == pid  # the first keeps serving, its store untouched
        assert first.store_path.exists()
    finally:
        _hypatiad(first_env, "stop")
    assert read_holder(store_lock_path(first)) == (None, None)  # released with the daemon


def test_a_postgresql_store_takes_no_store_lock(home):
    config = load(home.env | {"HYPATIA_STORE": "postgresql://u@db/x"})
    assert store_lock_path(config) is None


def test_daemon_whose_runtime_dir_is_removed_exits_and_a_client_gets_a_new_one(home, daemons):
    """Removing the runtime directory under a serving daemon: the next client starts a daemon
    at once, which waits for the old one to leave (it notices within a second or two) before it
    opens the store; the old one exits cleanly; never two daemons on the store."""
    old = daemons.start()
    shutil.rmtree(home.config.runtime_dir)

    new_pid = ensure_daemon(home.config)  # what a client does when it finds no daemon
    assert new_pid != old.pid
    assert old.wait(30) == 0
    assert daemon_stats(home.config)["pid"] == new_pid
    assert read_holder(store_lock_path(home.config)) == (new_pid, home.config.endpoint)

    log = daemons.log().splitlines()
    gone = [i for i, line in enumerate(log) if f"[{old.pid}]" in line and "was removed: no new client can reach" in line]
    stopped = [i for i, line in enumerate(log) if f"[{old.pid}]" in line and "hypatiad stopped" in line]
    serving = [i for i, line in enumerate(log) if f"[{new_pid}]" in line and " serving " in line]
    assert len(gone) == 1 and len(stopped) == 1 and len(serving) == 1, "\n".join(log[-30:])
    assert gone[0] < stopped[0] < serving[0]  # the new one served only once the old one had left
    assert home.config.socket_path.exists()  # the old one did not remove the new one's socket


def test_daemon_whose_socket_is_replaced_exits_without_removing_the_new_socket(home, daemons):
    """A socket path taken over by another bind (what a second daemon's ipc bind would do) is
    noticed by the inode, not only by the path's absence."""
    old = daemons.start()
    sock = home.config.socket_path
    stand_in = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stand_in.bind(str(home.config.runtime_dir / "other.sock"))
    os.replace(home.config.runtime_dir / "other.sock", sock)  # atomic: the path never goes missing
    try:
        assert old.wait(30) == 0
        assert sock.exists()  # left alone: it is not the old daemon's
        assert "was replaced by another" in daemons.log()
    finally:
        stand_in.close()


def test_daemon_whose_lock_file_is_removed_exits(home, daemons):
    old = daemons.start()
    home.config.lock_path.unlink()
    assert old.wait(30) == 0
    assert f"its lock file {home.config.lock_path} was removed or replaced" in daemons.log()
    assert not home.config.socket_path.exists()  # its own socket: removed on the way out
