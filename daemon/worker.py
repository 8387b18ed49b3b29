"""A hypatiad worker process: plans (``plan``) or tunes (``tune``) one job at a time for the daemon.

The daemon starts it as ``python -m hypatia.daemon.worker KIND`` and talks to it over its stdin
and stdout: frames of a 4-byte big-endian length and a msgpack body. The worker first sends
``{"ready": pid}``, then answers each request ``{"op", "keys", "job", "policy"}`` with
``{"ok": True, "result", "counters", "rss"}`` or ``{"ok": False, "error", "skip", "transient", "damaged",
"counters", "rss"}``, and exits when its stdin closes. Isolation is the point: the daemon kills
a worker that runs past its deadline or its memory, and a worker that dies takes nothing of the
daemon with it. A tuning worker runs at a lower CPU priority than the clients it serves.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import signal
import struct
import sys
import threading
import time
from collections import Counter
from typing import Any, BinaryIO

import msgpack

HEADER = struct.Struct(">I")
TUNER_NICE = 10  # clients compiling on the same cores come first
PR_SET_PDEATHSIG = 1


def write_frame(out: BinaryIO, obj: Any) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    out.write(HEADER.pack(len(data)) + data)
    out.flush()


def read_frame(inp: BinaryIO) -> Any | None:
    """The next frame from ``inp``, or None at end of file."""
    head = inp.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    data = inp.read(size)
    if len(data) < size:
        return None
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def rss_bytes() -> int:
    """This process's resident memory now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _die_with_parent() -> None:
    """Exit when the daemon does, even while busy: SIGKILL on its death where Linux offers it,
    and a watcher thread elsewhere."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="hypatia-worker-parent", daemon=True).start()


def _snapshot(service, store) -> list[Counter]:
    from hypatia.planner import counters as planner_counters

    return [Counter(service.counters), Counter(planner_counters.counters), Counter(store.counters)]


def _counters(before: list[Counter], service, store) -> dict[str, dict]:
    """What this job added to the counters the daemon reports."""
    after = _snapshot(service, store)
    return {name: dict(a - b) for name, a, b in zip(("service", "planner", "store"), after, before)}


def handle(request: dict, service, faults) -> Any:
    """Run one job: a planning or a tuning, with the faults tests switch on."""
    from hypatia.canonical import CanonicalGraph

    keys = tuple(request["keys"])
    job = request.get("job")
    if job is not None:
        job = dict(job, graph=CanonicalGraph.from_wire(job["wire"]))
    if request["op"] == "plan":
        faults.planning()
        return service.make_plan(keys, job, request["policy"])
    faults.tuning()
    return service.tune(keys, job, request["policy"])


def _identity(store) -> tuple[int, int] | None:
    """The SQLite file the store opened, as (device, inode); None for PostgreSQL or no file."""
    try:
        st = os.stat(store.path) if store.path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_dev, st.st_ino)


def main(argv: list[str]) -> int:
    kind = argv[0] if argv else ""
    if kind not in ("plan", "tune"):
        print("usage: python -m hypatia.daemon.worker plan|tune (started by hypatiad)", file=sys.stderr)
        return 2
    # Frames travel on a private copy of stdout; whatever a library prints goes to the log.
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = os.fdopen(0, "rb")
    _die_with_parent()
    # A Ctrl-C of a foreground daemon, or systemd's SIGTERM to the whole unit, is the daemon's to
    # handle: it drains, then kills its workers itself.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if kind == "tune":
        os.nice(TUNER_NICE)

    from hypatia.config import load
    from hypatia.daemon.logs import configure_logging
    from hypatia.daemon.faults import Faults
    from hypatia.daemon.service import PlanService
    from hypatia.planner.databases import StoreError, UnreadableStore
    from hypatia.planner.store import Store

    config = load()
    configure_logging(config, to_stderr=False, worker=True)
    log = logging.getLogger(f"hypatia.worker.{kind}")
    faults = Faults.parse(config.faults)
    store = Store(config.store_location, migrate=False, retry_s=config.store_retry_s)  # the daemon's, migrated: never moved aside from here
    opened = _identity(store)
    service = PlanService(config, store)
    # what the first job would import, imported now: before the first request, not during it
    importlib.import_module("hypatia.planner.tuner" if kind == "tune" else "egglog.bindings")

    write_frame(channel, {"ready": os.getpid()})
    while True:
        request = read_frame(inp)
        if request is None:
            store.close()
            return 0
        if _identity(store) != opened:  # the daemon repaired a damaged file: follow it to the fresh one
            store.close()
            store = service.store = Store(config.store_location, migrate=False, retry_s=config.store_retry_s)
            opened = _identity(store)
        before = _snapshot(service, store)
        try:
            reply = {"ok": True, "result": handle(request, service, faults)}
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the daemon, which decides
            skip = bool(getattr(exc, "skip", False))
            quiet = skip or isinstance(exc, StoreError)  # the store's own words say it all
            (log.warning if skip else log.error if quiet else log.exception)(
                "%s %s failed: %s", request.get("op"), str(request.get("keys"))[:60], exc)
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "skip": skip,
                     "transient": isinstance(exc, StoreError), "damaged": isinstance(exc, UnreadableStore)}
        reply |= {"counters": _counters(before, service, store), "rss": rss_bytes()}
        write_frame(channel, reply)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
