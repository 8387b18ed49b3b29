"""What sharing Inductor's compiled artifacts through the daemon did, read from the counters the
client and the daemon keep; and a consistent copy of a daemon's store, for a "new host".

A client session counts, per graph: ``artifacts_compiled`` (compiled with Inductor here and sent
to the daemon), ``artifacts_loaded`` (artifacts from the daemon loaded before compiling),
``artifacts_waited`` (waited for another process's compile), ``artifacts_took_over`` (a wait
that ended with this process compiling) and ``warm_starts`` (Hypatia's trace skipped entirely).
The daemon's stats carry an ``artifacts`` entry. A Hypatia that does not share artifacts has
neither: the readers here return None then, and :func:`absent_notes` says so once per section.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any, Callable

CLIENT_COUNTERS = ("artifacts_compiled", "artifacts_loaded", "artifacts_waited", "artifacts_took_over", "warm_starts")
DAEMON_COUNTERS = ("count", "bytes", "limit_bytes", "hits", "misses", "stored", "evicted", "quarantined",
                   "compiles_granted", "waits", "takeovers")
INDUCTOR_COUNTERS = ("fxgraph_cache_hit", "fxgraph_cache_miss", "autograd_cache_hit", "autograd_cache_miss")


def client_counters(hypatia_counters: dict[str, int]) -> dict[str, int] | None:
    """The artifact counters of one session's counters (those it never bumped as 0), or None
    when it has none of them: a Hypatia that does not share artifacts."""
    if not any(k in hypatia_counters for k in CLIENT_COUNTERS):
        return None
    return {k: hypatia_counters.get(k, 0) for k in CLIENT_COUNTERS}


def inductor_counters(cache_counters: dict[str, int]) -> dict[str, int]:
    """Inductor's FX graph and AOTAutograd cache hits and misses, absent ones as 0."""
    return {k: cache_counters.get(k, 0) for k in INDUCTOR_COUNTERS}


def daemon_artifacts(home: Path) -> dict[str, Any] | None:
    """The ``artifacts`` entry of the stats of the daemon serving ``home``, or None where its
    stats have none. Raises what asking the daemon raises (it is not running, ...)."""
    from benchmarks.hypatia_runs import daemon_stats
    from hypatia.config import load

    entry = daemon_stats(load({"HYPATIA_HOME": str(home)})).get("artifacts")
    return dict(entry) if isinstance(entry, dict) else None


def store_path(home: Path) -> Path:
    """Where the daemon of ``home`` keeps its SQLite store."""
    from hypatia.config import load

    return load({"HYPATIA_HOME": str(home)}).store_path


def copy_store(source: Path, target: Path) -> int:
    """Copy the SQLite store at ``source`` to ``target`` through SQLite's backup API, which gives
    a consistent copy even of a store a daemon is writing; returns the copy's size in bytes."""
    if not source.is_file():
        raise FileNotFoundError(f"no store at {source} to copy")
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(f"file:{source}?mode=rw", uri=True)) as src, \
            contextlib.closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
    return target.stat().st_size


def absent_notes(rows: list[dict], label: Callable[[dict], str]) -> list[str]:
    """One note for the rows whose process counted no artifacts and one for those whose daemon
    keeps none (rows carry ``artifacts`` / ``daemon_artifacts`` where they were read)."""
    no_client = [label(r) for r in rows if "artifacts" in r and r["artifacts"] is None]
    no_daemon = [label(r) for r in rows if "daemon_artifacts" in r and r["daemon_artifacts"] is None]
    notes = []
    if no_client:
        notes.append(f"no process counted {', '.join(CLIENT_COUNTERS)} ({', '.join(no_client)}): this Hypatia does not "
                     "share Inductor's compiled artifacts through the daemon, so those figures are missing")
    if no_daemon:
        notes.append(f"the daemon's stats have no 'artifacts' entry ({', '.join(no_daemon)}): it keeps no compiled "
                     "artifacts, so their figures are missing")
    return notes
