"""The daemon's log stays useful: one line per failed request (its traceback only at DEBUG),
the same failure repeated logged at its 1st, 2nd, 4th, 8th... occurrence with a count of those
left out, and the file rotated past HYPATIA_LOG_MAX_BYTES."""

from __future__ import annotations

import logging

import pytest

from conftest import daemon_stats
from fault_helpers import connection, daemons  # noqa: F401  (daemons: a fixture)
from hypatia.daemon.failures import FailureLog
from hypatia.protocol import ErrorCode, RemoteError


def _flood(home, n: int) -> None:
    """``n`` pings that fail inside the daemon (fault fail=ping) and ``n`` malformed get_plans."""
    with connection(home, retries=0) as c:
        for _ in range(n):
            with pytest.raises(RemoteError) as info:
                c.call("ping")
            assert info.value.code is ErrorCode.INTERNAL
            with pytest.raises(RemoteError) as info:
                c.call("get_plan", {"graph_key": 5})
            assert info.value.code is ErrorCode.BAD_REQUEST


def test_a_flood_of_failing_requests_leaves_a_few_lines_and_no_traceback(home, daemons):
    daemons.start(faults="fail=ping")
    _flood(home, 300)
    stats = daemon_stats(home.config)
    assert stats["errors"] == {"INTERNAL": 300, "BAD_REQUEST": 300}

    log = daemons.log()
    assert "Traceback" not in log
    pings = [line for line in log.splitlines() if "ping failed: RuntimeError: fault injected: fail=ping" in line]
    plans = [line for line in log.splitlines() if "get_plan failed: BAD_REQUEST: field 'graph_key' must be a string, not int" in line]
    assert len(pings) == len(plans) == 9  # the 1st, 2nd, 4th, ... 256th
    assert all(" ERROR " in line for line in pings) and all(" WARNING " in line for line in plans)
    assert pings[0].endswith("fault injected: fail=ping")
    assert pings[-1].endswith("[256 such failures so far, 127 not logged since the last]")
    assert len(log.splitlines()) < 40


def test_at_debug_every_failure_and_its_traceback_are_logged_and_the_file_rotates(home, daemons):
    limit = 4096
    daemons.start(faults="fail=ping", extra_env={"HYPATIA_LOG_LEVEL": "DEBUG", "HYPATIA_LOG_MAX_BYTES": str(limit)})
    _flood(home, 60)
    daemon_stats(home.config)  # every failure is logged by the time the next request is answered
    path = home.config.log_path
    files = [path, *(path.with_name(f"{path.name}.{k}") for k in (1, 2, 3))]
    assert all(f.exists() for f in files) and not path.with_name(f"{path.name}.4").exists()
    assert all(f.stat().st_size <= limit for f in files), [f.stat().st_size for f in files]
    text = "".join(f.read_text(errors="replace") for f in files)
    assert "Traceback" in text and "RuntimeError: fault injected: fail=ping" in text


def test_failure_log_counts_what_it_leaves_out(caplog):
    failures = FailureLog(logging.getLogger("hypatia.test"))
    with caplog.at_level(logging.INFO, logger="hypatia.test"):
        shown = [failures.failed("make_plan", "BAD_REQUEST", f"request {k}") for k in range(1, 11)]
        failures.failed("run", "BAD_REQUEST", "another kind")
    assert [k + 1 for k, s in enumerate(shown) if s] == [1, 2, 4, 8]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["make_plan failed: BAD_REQUEST: request 1",
                        "make_plan failed: BAD_REQUEST: request 2 [2 such failures so far, 0 not logged since the last]",
                        "make_plan failed: BAD_REQUEST: request 4 [4 such failures so far, 1 not logged since the last]",
                        "make_plan failed: BAD_REQUEST: request 8 [8 such failures so far, 3 not logged since the last]",
                        "run failed: BAD_REQUEST: another kind"]
