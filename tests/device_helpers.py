"""What the hypatia device's tests share: a daemon of their module's own, and a fresh device
session of the test process with it."""

from __future__ import annotations

import pytest

from conftest import daemon_of_its_own_home, daemon_stats
from hypatia.device import trace


@pytest.fixture(scope="module")
def config():
    with daemon_of_its_own_home(HYPATIA_EXECUTOR="aten") as config:
        yield config


@pytest.fixture
def rec(config):
    """A fresh device session of this process with the module's daemon."""
    recorder = trace.connect(config)
    yield recorder
    recorder.link.close()


def device_stats(config) -> dict:
    return daemon_stats(config)["device"]
