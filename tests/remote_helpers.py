"""Helpers of the remote-mode tests: /dev/shm contents, waiting."""

from __future__ import annotations

import os

import pytest

from conftest import wait_until
from hypatia import shm

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


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """:func:`conftest.wait_until`, failing the test when ``what`` does not come in time."""
    if not wait_until(predicate, timeout):
        raise AssertionError(f"timed out waiting for {what}")
