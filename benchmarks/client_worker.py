"""One client process of the ``clients`` section: ``python -m benchmarks.client_worker PARAMS``.

It connects to the daemon of ``HYPATIA_HOME`` with :class:`DaemonClient`, then for each phase
in PARAMS (a msgpack file) touches ``<ready_dir>/<phase>-<index>``, reads from stdin the
``time.monotonic_ns()`` at which every client starts, and issues its requests back to back,
timing each. It writes JSON to ``out``. It never imports torch, so that dozens of clients start
quickly.

Phase kinds: ``hit`` sends ``get_plan`` bodies that must find a plan; ``miss`` sends pairs of
bodies, a ``get_plan`` that must miss and the ``make_plan`` that must plan (the sequence a
compile sends for a graph the daemon has not seen), timed together.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from hypatia.client.rpc import DaemonClient
from hypatia.config import load
from hypatia.protocol import unpack

MAX_PARAMS_BYTES = 1 << 30


def _hit(client: DaemonClient, body: dict) -> dict:
    plan = client.call("get_plan", body)["plan"]
    if plan is None:
        raise LookupError(f"get_plan missed {body['graph_key'][:16]}, expected a stored plan")
    if plan.get("graph_key") != body["graph_key"]:
        raise LookupError(f"get_plan for {body['graph_key'][:16]} answered a plan for another graph")
    return plan


def _miss(client: DaemonClient, lookup: dict, body: dict) -> dict:
    if client.call("get_plan", lookup)["plan"] is not None:
        raise LookupError(f"get_plan hit {lookup['graph_key'][:16]}, expected a miss")
    plan = client.call("make_plan", body)["plan"]
    if plan is None or plan.get("graph_key") != body["graph_key"]:
        raise LookupError(f"make_plan for {body['graph_key'][:16]} returned no plan for that graph")
    return plan


def run_phase(client: DaemonClient, kind: str, requests: list[Any], go_ns: int) -> dict:
    """Wait until ``go_ns``, then send every request in turn; per request its latency (us), for
    a miss the daemon's planning time, and what went wrong."""
    latency_us: list[float] = []
    planning_ms: list[float] = []
    failures: list[str] = []
    delay = (go_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)
    start_ns = time.monotonic_ns()
    for request in requests:
        t0 = time.monotonic_ns()
        try:
            plan = _hit(client, request) if kind == "hit" else _miss(client, *request)
        except Exception as exc:  # noqa: BLE001 - counted and reported; the other requests still run
            plan = None
            failures.append(f"{type(exc).__name__}: {exc}"[:300])
        latency_us.append((time.monotonic_ns() - t0) / 1e3)
        # a stored recipe keeps the planning time of the request that made it: only a miss's is its own
        if kind == "miss" and plan is not None and "planning_ms" in plan:
            planning_ms.append(plan["planning_ms"])
    return {"kind": kind, "start_ns": start_ns, "end_ns": time.monotonic_ns(), "latency_us": latency_us,
            "planning_ms": planning_ms, "failures": failures}


def main(argv: list[str]) -> int:
    params = unpack(Path(argv[1]).read_bytes(), MAX_PARAMS_BYTES)
    ready = Path(params["ready_dir"])
    # no retries: a resent request would be counted twice by the daemon and hide a slow answer
    client = DaemonClient(load(), timeout_ms=params["timeout_ms"], retries=0)
    t0 = time.monotonic_ns()
    client.call("ping")  # connect and handshake before the barrier; neither is part of a phase
    result: dict = {"pid": os.getpid(), "connect_ms": (time.monotonic_ns() - t0) / 1e6, "phases": []}
    try:
        for i, phase in enumerate(params["phases"]):
            (ready / f"{i}-{params['index']}").touch()
            line = sys.stdin.readline()
            if not line.strip():
                break  # the parent gave up on this group
            result["phases"].append(run_phase(client, phase["kind"], phase["requests"], int(line)))
    finally:
        client.close()
        Path(params["out"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
