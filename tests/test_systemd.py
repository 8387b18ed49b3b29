"""systemd integration: sd_notify over a real AF_UNIX datagram NOTIFY_SOCKET (READY, STATUS,
WATCHDOG, STOPPING), the idle timeout, and the unit file checked by systemd-analyze."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "hypatiad.service"


class NotifySocket:
    """What systemd listens on: a datagram socket whose messages the test reads."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="hyn-", dir="/tmp"))
        self.path = self.dir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[str] = []

    def read_for(self, seconds: float, until=None) -> list[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                break
            if until is not None and until(self.messages):
                break
        return self.messages

    def close(self):
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify():
    n = NotifySocket()
    yield n
    n.close()


def _foreground(home, notify, **env) -> subprocess.Popen:
    environ = home.env | {"NOTIFY_SOCKET": str(notify.path)} | env
    return subprocess.Popen([sys.executable, "-m", "hypatia.daemon", "start", "--foreground"], env=environ,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_ready_status_watchdog_and_stopping_reach_a_real_notify_socket(home, notify):
    proc = _foreground(home, notify, WATCHDOG_USEC="400000")  # a ping every 0.2 s
    try:
        messages = notify.read_for(30, until=lambda m: any("READY=1" in x for x in m))
        ready = next(m for m in messages if "READY=1" in m)
        assert f"MAINPID={proc.pid}" in ready and "STATUS=serving" in ready
        before = len(messages)
        time.sleep(0.1)
        messages = notify.read_for(1.5)
        pings = [m for m in messages[before:] if m == "WATCHDOG=1"]
        assert len(pings) >= 4, messages
        assert any(m.startswith("STATUS=serving") and "hits" in m for m in messages), messages
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        messages = notify.read_for(1.0, until=lambda m: "STOPPING=1" in m)
        assert "STOPPING=1" in messages
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_no_watchdog_pings_when_the_watchdog_is_for_another_process(home, notify):
    proc = _foreground(home, notify, WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    try:
        notify.read_for(30, until=lambda m: any("READY=1" in x for x in m))
        messages = notify.read_for(1.0)
        assert "WATCHDOG=1" not in messages and any("READY=1" in m for m in messages)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_idle_timeout_stops_an_unused_daemon_cleanly(home):
    home.env["HYPATIA_IDLE_TIMEOUT_S"] = "2"
    home.hypatiad("start")
    pid = home.daemon_pid()
    assert pid is not None
    assert home.run("-m", "hypatia.daemon", "status").returncode == 0  # a request: the clock restarts
    deadline = time.monotonic() + 20
    while home.daemon_pid() is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert home.daemon_pid() is None, "the idle daemon did not exit"
    assert "no request for 2 s" in home.config.log_path.read_text()
    assert not home.config.socket_path.exists()


def test_unit_file_is_a_notify_unit_with_a_watchdog_and_verifies():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "start --foreground", "NotifyAccess=main"):
        assert line in text, line
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here; the unit's content was checked above")
    proc = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, SYSTEMD_LOG_LEVEL="warning"))
    assert proc.returncode == 0, proc.stderr
