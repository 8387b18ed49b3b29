"""Helpers of the remote-mode tests: /dev/shm contents, daemon stats from this process, waiting."""

from __future__ import annotations

import os
import time

import pytest

from hypatia import shm
from hypatia.client.rpc import DaemonClient

UID = os.getuid()


def segments() -> set[str]:
    """This user's Hypatia segments in /dev/shm."""
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith(f"hypatia-{UID}-")}


@pytest.fixture
def clean_shm():
    """Fails the test if it leaves a Hypatia segment behind that was not there before."""
    before = segments()
    yield
    assert segments() - before == set()


def daemon_stats(config) -> dict:
    """The daemon's stats, asked from this process (cheaper than a hypatia-ctl process per poll)."""
    client = DaemonClient(config, timeout_ms=10000, retries=0)
    try:
        return client.call("stats")
    finally:
        client.close()


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
