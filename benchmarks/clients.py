"""N client processes x M plan requests against one hypatiad: latency percentiles and throughput.

One daemon is started the way a user starts it (``python -m hypatia.daemon start``) in a fresh
HYPATIA_HOME. For each N, N client processes (``benchmarks.client_worker``) connect, wait at a
barrier and run two phases in lockstep: ``make_plan_miss`` (each client asks for graphs nobody
has planned: a ``get_plan`` miss, then the ``make_plan`` that plans it) and ``get_plan_hit``
(every client looks up plans stored before, as every rank after the first does). The bodies
are those the backend sends for real models' graphs (:mod:`benchmarks.plan_requests`). After
each phase the daemon's ``stats`` are read, and its hit, miss and plan counters must match what
the clients sent; a mismatch is reported as the row's error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from benchmarks.fresh_process import daemon_pid
from benchmarks.multiprocess import REPO, base_env, run_module
from benchmarks.plan_requests import PlanRequest, distinct_requests, model_requests
from benchmarks.workloads import by_name
from hypatia.client.rpc import DaemonClient
from hypatia.config import load
from hypatia.planner.measure import quantile
from hypatia.protocol import pack

# The first compile's policy: answered from the static cost model, so no background tuning
# competes with the requests for the CPU.
POLICY = "HEURISTIC"
# Far above any answer here: a client that timed out would resend, and the daemon would count
# the request twice. Answers slower than the client's default timeout are counted instead.
TIMEOUT_MS = 600_000
READY_TIMEOUT_S = 120.0
# Graphs of the miss phase: the MLP workloads at batch 1, 2, 3, ... (cheap to capture).
MISS_SOURCES = (("mlp_small", False), ("mlp_small", True), ("mlp_large", False), ("mlp_large", True))
COUNTERS = ("hits", "misses", "plans_made", "coalesced", "graphs", "errors", "clients_seen")


@dataclass(frozen=True)
class Sizes:
    counts: tuple[int, ...]  # N, clients per group
    hit_requests: int  # M, get_plan hits per client
    miss_requests: int  # misses per client (each one plans)
    hit_workloads: tuple[str, ...]  # whose inference and training graphs the hits look up


FULL = Sizes((1, 4, 16, 64), 500, 4, ("mlp_small", "mlp_large", "transformer_block", "convnet"))
QUICK = Sizes((1, 4), 100, 2, ("mlp_small",))


class DaemonStats:
    """The daemon's ``stats``, read over its socket; :meth:`counters` picks the ones checked."""

    def __init__(self, env: dict):
        self.client = DaemonClient(load(env), timeout_ms=30_000)

    def counters(self) -> dict[str, int]:
        s = self.client.call("stats")
        cache = s["plan_cache"]
        return {"hits": cache["hits"], "misses": cache["misses"], "plans_made": cache["plans_made"],
                "coalesced": cache["coalesced"], "graphs": s["graphs"], "errors": s["error_total"],
                "clients_seen": s["clients_seen"]}

    def plan(self, requests: list[PlanRequest]) -> None:
        """Have the daemon plan and store ``requests`` (the plans the hit phase finds)."""
        for r in requests:
            if self.client.call("make_plan", r.make_plan(POLICY), timeout_ms=TIMEOUT_MS)["plan"] is None:
                raise RuntimeError(f"make_plan returned no plan for {r.source}")

    def close(self) -> None:
        self.client.close()


@contextlib.contextmanager
def private_daemon() -> Iterator[tuple[Path, dict]]:
    """A daemon started as a user starts one, in a fresh HYPATIA_HOME; stopped and removed after."""
    # Short on purpose: the daemon's ipc socket path lives under it and must fit in 107 bytes.
    home = Path(tempfile.mkdtemp(prefix="hyc-", dir="/tmp"))
    env = base_env(home)
    try:
        started = run_module(env, "hypatia.daemon", "start")
        if started.returncode != 0:
            raise RuntimeError(f"hypatiad start exited {started.returncode}: {(started.stderr or started.stdout)[-800:]}")
        yield home, env
    finally:
        if daemon_pid(home) is not None:
            run_module(env, "hypatia.daemon", "stop")
        shutil.rmtree(home, ignore_errors=True)


def latency_row(kind: str, clients: int, per_client: int, phases: list[dict]) -> dict:
    """Percentiles over every request of every client; throughput over the window from the first
    request's start to the last one's end."""
    samples = sorted(us / 1e3 for p in phases for us in p["latency_us"])
    row: dict = {"kind": kind, "clients": clients, "requests_per_client": per_client, "samples": len(samples)}
    if not samples:
        return row
    start, end = min(p["start_ns"] for p in phases), max(p["end_ns"] for p in phases)
    window = (end - start) / 1e9
    overlap = max(0, min(p["end_ns"] for p in phases) - max(p["start_ns"] for p in phases)) / 1e9
    row |= {
        "p50_ms": round(quantile(samples, 0.5), 4), "p99_ms": round(quantile(samples, 0.99), 4),
        "max_ms": round(samples[-1], 4), "mean_ms": round(statistics.fmean(samples), 4),
        "window_s": round(window, 4), "throughput_rps": round(len(samples) / window, 1) if window > 0 else None,
        # share of the window in which every client was sending: how well the barrier lined them up
        "all_active_share": round(overlap / window, 3) if window > 0 else None,
    }
    planning = sorted(ms for p in phases for ms in p["planning_ms"])
    if planning:
        row |= {"planning_ms_p50": round(quantile(planning, 0.5), 3), "planning_ms_max": round(planning[-1], 3)}
    return row


def _expected(kind: str, requests: int) -> dict[str, int]:
    """The change in the daemon's counters that ``requests`` of ``kind`` must cause."""
    if kind == "hit":
        return {"hits": requests, "misses": 0, "plans_made": 0, "coalesced": 0, "graphs": 0, "errors": 0}
    return {"hits": 0, "misses": requests, "plans_made": requests, "coalesced": 0, "graphs": requests, "errors": 0}


def _wait_ready(ready: Path, phase: int, procs: list[subprocess.Popen], deadline: float) -> None:
    while len(list(ready.glob(f"{phase}-*"))) < len(procs):
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{len(dead)} client(s) exited before phase {phase} (first exit {dead[0].returncode})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"clients not ready for phase {phase} after {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.005)


def _release(procs: list[subprocess.Popen], ready: Path, phases: int, stats: DaemonStats,
             before: dict[str, int]) -> list[dict[str, int]]:
    """Start each phase once every client is ready for it; the daemon's counters ``before`` the
    first client started, at the start of each later phase and after the last client exited."""
    snapshots = [before]
    for k in range(phases):
        _wait_ready(ready, k, procs, time.monotonic() + READY_TIMEOUT_S)
        if k:
            snapshots.append(stats.counters())
        # far enough ahead that every client has read the line and sleeps until it
        go = time.monotonic_ns() + int((0.05 + 0.005 * len(procs)) * 1e9)
        for p in procs:
            p.stdin.write(f"{go}\n")
            p.stdin.flush()
    for p in procs:
        p.stdin.close()
        p.wait(timeout=TIMEOUT_MS / 1000)
    snapshots.append(stats.counters())
    return snapshots


def phase_row(kind: str, got: list[dict], sent_per_client: int, clients: int, before: dict[str, int],
              after: dict[str, int], first: bool, problems: list[str], client_timeout_ms: int) -> dict:
    """One phase's row: latency and throughput, the daemon's counters against what was sent, and
    an ``error`` naming every mismatch and failure."""
    row = latency_row("get_plan_hit" if kind == "hit" else "make_plan_miss", clients, sent_per_client, got)
    sent = clients * sent_per_client
    delta = {c: after[c] - before[c] for c in COUNTERS}
    expected = _expected(kind, sent) | {"clients_seen": clients if first else 0}
    failures = [f for p in got for f in p["failures"]]
    row |= {"failed": len(failures), "daemon": delta, "expected": expected}
    errors = list(problems)
    if failures:
        errors.append(f"{len(failures)} of {sent} requests failed; first: {failures[0]}")
    if row["samples"] != sent:
        errors.append(f"{row['samples']} samples for {sent} requests sent")
    wrong = [f"{c} {delta[c]} (expected {v})" for c, v in expected.items() if delta[c] != v]
    if wrong:
        errors.append("daemon counters differ from what was sent: " + ", ".join(wrong))
    if kind == "miss":
        # a compile with the default client timeout would have resent these (then planned in-process)
        row["over_default_client_timeout"] = sum(us / 1e3 > client_timeout_ms for p in got for us in p["latency_us"])
    if errors:
        row["error"] = "; ".join(errors)
    return row


def run_group(env: dict, home: Path, stats: DaemonStats, phases: list[tuple[str, list[list]]]) -> list[dict]:
    """N client processes run ``phases``, [(kind, requests of each client)], in lockstep; one row
    per phase."""
    n = len(phases[0][1])
    scratch = Path(tempfile.mkdtemp(prefix=f"g{n}-", dir=home))
    ready = scratch / "ready"
    ready.mkdir()
    for i in range(n):
        params = {"index": i, "ready_dir": str(ready), "out": str(scratch / f"{i}.json"), "timeout_ms": TIMEOUT_MS,
                  "phases": [{"kind": kind, "requests": per_client[i]} for kind, per_client in phases]}
        (scratch / f"{i}.params").write_bytes(pack(params))
    procs: list[subprocess.Popen] = []
    before = stats.counters()  # before any client runs: the first ones say hello while others start
    try:
        for i in range(n):
            # output to a file, not a pipe: nobody reads it until the end
            with open(scratch / f"{i}.log", "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.client_worker", str(scratch / f"{i}.params")], cwd=REPO,
                    env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True,
                    start_new_session=True))
        snapshots = _release(procs, ready, len(phases), stats, before)
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    outputs, problems = [], []
    for i, p in enumerate(procs):
        try:
            if p.returncode != 0:
                raise ValueError(f"exit {p.returncode}")
            outputs.append(json.loads((scratch / f"{i}.json").read_text()))
        except (OSError, ValueError) as exc:
            problems.append(f"client {i}: {exc}: {(scratch / f'{i}.log').read_text()[-500:]}")
    timeout_ms = load(env).timeout_ms
    return [phase_row(kind, [o["phases"][k] for o in outputs if len(o["phases"]) > k], len(per_client[0]), n,
                      snapshots[k], snapshots[k + 1], k == 0, problems, timeout_ms)
            for k, (kind, per_client) in enumerate(phases)]


def hit_set(workloads: tuple[str, ...], quick: bool) -> list[PlanRequest]:
    """The inference and training graphs of ``workloads`` at their benchmark batch on the CPU."""
    return [r for w in workloads for training in (False, True)
            for r in model_requests(w, by_name(w).batch_for("cpu", quick=quick), training)]


def group_phases(n: int, sizes: Sizes, fresh: list[PlanRequest], stored: list[PlanRequest]) -> list[tuple[str, list[list]]]:
    """The requests of ``n`` clients: first each misses on its share of ``fresh`` graphs, then
    each looks up ``sizes.hit_requests`` of the ``stored`` ones, starting at a different one."""
    m = sizes.miss_requests
    misses = [[[r.get_plan(POLICY), r.make_plan(POLICY)] for r in fresh[i * m:(i + 1) * m]] for i in range(n)]
    hits = [[stored[(i + j) % len(stored)].get_plan(POLICY) for j in range(sizes.hit_requests)] for i in range(n)]
    return [("miss", misses), ("hit", hits)]


def measure(sizes: Sizes, quick: bool, budget_s: float = float("inf")) -> dict:
    """Run every group of ``sizes`` against one daemon; groups past ``budget_s`` are skipped."""
    started = time.monotonic()
    hits = hit_set(sizes.hit_workloads, quick)
    misses = distinct_requests(sum(sizes.counts) * sizes.miss_requests, MISS_SOURCES,
                               exclude=[r.graph_key for r in hits])
    capture_s = time.monotonic() - started
    rows: list[dict] = []
    with private_daemon() as (home, env):
        stats = DaemonStats(env)
        try:
            stats.plan(hits)
            offset = 0
            for n in sizes.counts:
                if time.monotonic() - started > budget_s:
                    rows += [{"kind": k, "clients": n, "skipped": "time budget"} for k in ("make_plan_miss", "get_plan_hit")]
                    continue
                fresh = misses[offset:offset + n * sizes.miss_requests]
                offset += len(fresh)
                try:
                    rows += run_group(env, home, stats, group_phases(n, sizes, fresh, hits))
                except Exception as exc:  # noqa: BLE001 - one failed group must not end the section
                    rows.append({"kind": "group", "clients": n, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            stats.close()
    nodes = sorted(r.nodes for r in hits)
    notes = [
        f"one hypatiad; per N, N client processes (DaemonClient, no retries) start each phase together behind a "
        f"barrier; policy {POLICY}; latency per request on the monotonic clock, throughput = requests / window "
        "from the first request's start to the last one's end",
        f"get_plan_hit: {sizes.hit_requests} lookups per client cycling over {len(hits)} stored plans "
        f"({', '.join(sizes.hit_workloads)}; inference, forward and backward graphs of {nodes[0]}-{nodes[-1]} nodes)",
        f"make_plan_miss: {sizes.miss_requests} graphs per client that nobody planned before ({len(misses)} in all: "
        "the MLP workloads at batch 1, 2, ...); each timed from its get_plan miss to the make_plan reply, "
        "as a compile sees it; the daemon plans on 2 worker threads",
        f"graphs captured with Dynamo + AOTAutograd on the CPU in {capture_s:.1f} s before the daemon started; "
        f"the clients and the daemon share this machine's {os.cpu_count()} cores",
        f"over_default_client_timeout: misses answered after more than the default HYPATIA_TIMEOUT_MS "
        f"({load(base_env(Path('/tmp'))).timeout_ms} ms), which a compile would have resent",
    ]
    return {"rows": rows, "notes": notes}


def run(device: str, quick: bool, budget_s: float) -> dict:
    """The section as ``python -m benchmarks`` runs it (the daemon runs on the CPU whatever ``device``)."""
    return measure(QUICK if quick else FULL, quick, budget_s)
