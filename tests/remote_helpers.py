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


def _daemons_of(request) -> set[str]:
    """The ids of the daemons a test's fixtures name (a home, a config, a registered graph);
    read from the values the test was given, which outlive their fixtures' teardown."""
    from hypatia.config import Config

    ids = set()
    for value in request.node.funcargs.values():
        config = value if isinstance(value, Config) else getattr(value, "config", None)
        if isinstance(config, Config):
            ids.add(shm.daemon_id(config.socket_path))
        if isinstance(getattr(value, "daemon", None), str):
            ids.add(value.daemon)
    return ids


@pytest.fixture
def clean_shm(request):
    """Fails the test if it leaves a Hypatia segment behind that was not there before: one of
    the daemons its fixtures name, when they name any (what another test of this user, or a
    process beside the suite, has in flight at that moment is not this test's)."""
    before = segments()
    yield
    left = segments() - before
    daemons = _daemons_of(request)
    if daemons:
        left = {n for n in left if n.split("-")[2] in daemons}
    assert left == set(), left


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """:func:`conftest.wait_until`, failing the test when ``what`` does not come in time."""
    if not wait_until(predicate, timeout):
        raise AssertionError(f"timed out waiting for {what}")
