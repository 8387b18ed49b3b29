"""Hypatia's runtime rows: what a first process runs, and what a later process runs once the
daemon holds the tuned plan and the executor decision for every graph.

A "later process" is a fresh client session and a fresh Dynamo in the benchmark's own process.
The daemon is the same one, so its state is exactly what a second OS process on the host would
find; what is fresh in a new process and not here is Inductor's in-memory state, and its on-disk
cache is as warm as a second process's would be.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from hypatia.config import Config

# The HYPATIA_* settings of each Hypatia backend of the suite; a session reads them when it starts.
SETTINGS = {
    # what a first process runs before anything is measured: the plan the daemon answers at
    # once, under the default executor (the daemon tunes the plan in the background meanwhile)
    "hypatia_first": {"HYPATIA_POLICY": "FASTEST", "HYPATIA_EXECUTOR": "inductor"},
    # Hypatia as a user gets it: the default policy and executor choice
    "hypatia": {"HYPATIA_POLICY": "FASTEST", "HYPATIA_EXECUTOR": "auto"},
    # the static cost model's plan under the default executor, with no background tuning (families)
    "hypatia_static": {"HYPATIA_POLICY": "HEURISTIC", "HYPATIA_EXECUTOR": "auto"},
}
MAX_WARMUP_SESSIONS = 3
DAEMON_IDLE_TIMEOUT_S = 300.0


class DaemonNotIdle(TimeoutError):
    """The daemon still had planning or tuning in flight when the wait for it ended."""


def new_session(backend: str) -> None:
    """Forget this process's Hypatia session and Dynamo's compiled code: the next compile starts
    a session with ``backend``'s settings, as a new process would."""
    from hypatia.client.backend import reset_session

    torch._dynamo.reset()
    os.environ.update(SETTINGS[backend])
    reset_session()


def daemon_stats(config: Config | None = None) -> dict[str, Any]:
    """The stats of the daemon ``config`` names (default: the one this process's session talks to)."""
    from hypatia.client.rpc import DaemonClient
    from hypatia.config import load

    client = DaemonClient(config or load(), timeout_ms=30_000, retries=0)
    try:
        return client.call("stats")
    finally:
        client.close()


def wait_for_daemon(timeout_s: float = DAEMON_IDLE_TIMEOUT_S, poll_s: float = 0.1,
                    config: Config | None = None) -> float:
    """Wait until the daemon (of ``config``, default this process's) plans and tunes nothing;
    returns the seconds waited. Raises :class:`DaemonNotIdle` after ``timeout_s``."""
    started = time.monotonic()
    while True:
        stats = daemon_stats(config)
        if stats["inflight"] == 0 and stats["tuning_inflight"] == 0:
            return round(time.monotonic() - started, 3)
        if time.monotonic() - started > timeout_s:
            raise DaemonNotIdle(f"{stats['inflight']} planning and {stats['tuning_inflight']} tuning job(s) still "
                                f"in flight after {timeout_s:.0f} s")
        time.sleep(poll_s)


def steps_to_choose(device: str) -> int:
    """Steps after which every graph of a session has measured all its executor candidates."""
    from hypatia.client.choice import TIMED_CALLS, WARMUP_CALLS
    from hypatia.executors import ALL_CANDIDATES, EXECUTORS

    candidates = len(ALL_CANDIDATES) if device == "cuda" else len(EXECUTORS)
    return (WARMUP_CALLS + TIMED_CALLS) * candidates + 2


def measuring() -> bool:
    """Whether a graph of this session still measures its executors."""
    from hypatia.client.backend import session

    s = session()
    return s.counters["executor_measurements"] > len(s.choices)


def run_until_chosen(step: Callable[[], object], device: str) -> int:
    """Run ``step`` until this session's graphs have chosen their executors; returns the steps run."""
    steps = 0
    while measuring() and steps < steps_to_choose(device):
        step()
        steps += 1
    return steps


def plans_held(keys: list[tuple[str, str, str]]) -> dict[str, dict[str, Any]]:
    """What the daemon holds for a later session for each of ``keys``: whether the plan is tuned,
    and the executor decision kept with it (None where there is none)."""
    from hypatia.client.rpc import DaemonClient
    from hypatia.config import load

    client, held = DaemonClient(load(), timeout_ms=30_000, retries=0), {}
    try:
        for graph_key, workload_key, env_key in keys:
            # EXPLORE is answered the stored plan only where it is tuned, and unlike FASTEST never
            # queues a tuning: asking must not start work that would run during the timing
            recipe = client.call("get_plan", {"graph_key": graph_key, "workload_key": workload_key, "env_key": env_key,
                                              "policy": "EXPLORE"})["plan"] or {}
            decision = recipe.get("executor")
            held[f"{graph_key[:19]}/{workload_key[:15]}"] = {
                "tuned": bool(recipe.get("tuned")), "executor": decision["chosen"] if decision else None}
    finally:
        client.close()
    return held


def ready(held: dict[str, dict[str, Any]]) -> bool:
    return bool(held) and all(h["tuned"] and h["executor"] for h in held.values())


def warm_up(make_step: Callable[[], Callable[[], object]], device: str) -> dict[str, Any]:
    """Fresh ``hypatia`` sessions of one model, each compiled by ``make_step()`` (which starts its
    session with :func:`new_session`), run until its executors are chosen, and the daemon then
    left to finish tuning; until the daemon holds a tuned plan with an executor decision for
    every graph, at most :data:`MAX_WARMUP_SESSIONS`. Returns the ``hypatia`` row's warm-up fields."""
    from hypatia.client.backend import session

    started = time.monotonic()
    sessions, choices, held, notes, keys = 0, [], {}, [], []
    while sessions < MAX_WARMUP_SESSIONS and not ready(held):
        sessions += 1
        step = make_step()  # a new session: see new_session
        step()
        keys = list(session().plan_keys)  # a graph that could not be traced asks for no plan
        run_until_chosen(step, device)
        choices += [{"session": sessions} | c for c in session().choices]
        try:
            wait_for_daemon()
        except DaemonNotIdle as exc:
            notes.append(f"warm-up session {sessions}: {exc}")
        held = plans_held(keys)
        if not keys:
            notes.append("no graph of the model got a plan (none could be traced): nothing for the daemon to hold")
            break
    out = {"warmup_sessions": sessions, "warmup_s": round(time.monotonic() - started, 3),
           "warmup_choices": choices, "daemon_plans": held}
    if keys and not ready(held):
        notes.append(f"after {sessions} warm-up session(s) the daemon does not hold a tuned plan with an executor "
                     f"decision for every graph: {held}")
    return out | ({"warmup_notes": notes} if notes else {})


def session_report() -> dict[str, Any]:
    """This session's counters and what they say: the executors its graphs run, how many graphs
    it compiled and whether every one was served its executor by the daemon."""
    from hypatia.client.backend import session

    counters = Counter(session().counters)
    graphs = counters["graphs_inference"] + counters["graphs_training"]
    return {
        "graphs": graphs,
        "executors": {k[len("executor."):]: v for k, v in sorted(counters.items()) if k.startswith("executor.")},
        "served_from_daemon": graphs > 0 and counters["executor_from_daemon"] == graphs
                              and counters["executor_measurements"] == 0,
        "plans_tuned": sum(plan.tuned for _, plan in session().plans),
        "hypatia_counters": dict(counters),
    }
