"""N processes compiling the same model at once against one cold hypatiad.

The question is whether the daemon plans each graph once however many processes ask for it at
the same moment (``planned_per_graph`` 1.0), and what that costs in wall time against one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from benchmarks.first_call import base_env as clean_env, daemon_pid

REPO = Path(__file__).resolve().parent.parent
COUNTS = (2, 4, 8)
QUICK_COUNTS = (2,)

CHILD_CODE = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    from benchmarks.workloads import by_name, loss_of

    p = json.loads(sys.argv[1])
    w, dev = by_name(p["workload"]), torch.device(p["device"])
    torch.manual_seed(0)
    model = w.build().to(dev).train()
    inputs = w.make_inputs(p["batch"], dev, torch.float32)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    compiled = torch.compile(model, backend="hypatia")
    loss_of(compiled(*inputs)).backward()
    sync()
    elapsed = time.perf_counter() - start
    from hypatia.client.backend import session
    print(json.dumps({"pid": os.getpid(), "time_to_first_call_s": elapsed, "hypatia_counters": dict(session().counters)}))
    """
)


def base_env(home: Path) -> dict:
    """first_call's clean environment, with this run's HYPATIA_HOME and Inductor cache."""
    # Keep Dynamo's own files out of the user's default /tmp/torchinductor_$USER.
    return clean_env() | {"HYPATIA_HOME": str(home), "TORCHINDUCTOR_CACHE_DIR": str(home / "inductor")}


def run_module(env: dict, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m <argv>`` in the repository with ``env``, output captured."""
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_group(n: int, params: dict, timeout: float) -> dict:
    """Start a cold daemon in a fresh HYPATIA_HOME, run ``n`` children at once, read the daemon's stats."""
    # Short on purpose: the daemon's ipc socket path lives under it and must fit in 107 bytes.
    home = Path(tempfile.mkdtemp(prefix="hyb-", dir="/tmp"))
    env = base_env(home)
    row: dict = {}
    try:
        started = run_module(env, "hypatia.daemon", "start")
        if started.returncode != 0:
            raise RuntimeError(f"hypatiad start exited {started.returncode}: {(started.stderr or started.stdout)[-800:]}")
        # Children write to files, not pipes: n processes' stderr could fill a pipe nobody reads yet.
        logs = [(open(home / f"out{i}", "w+"), open(home / f"err{i}", "w+")) for i in range(n)]
        argv = [sys.executable, "-c", CHILD_CODE, json.dumps(params)]
        t0 = time.perf_counter()
        # Each in a session of its own, so a timeout ends its compile workers too.
        procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=o, stderr=e, start_new_session=True) for o, e in logs]
        deadline = t0 + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        row["wall_s"] = round(time.perf_counter() - t0, 3)
        firsts, errors, counters = [], [], {}
        for proc, (out, err) in zip(procs, logs):
            out.seek(0), err.seek(0)
            stdout, stderr = out.read(), err.read()
            out.close(), err.close()
            try:
                if proc.returncode != 0:
                    raise ValueError(f"exit {proc.returncode}" + (" (killed at the timeout)" if proc.returncode < 0 else ""))
                result = json.loads(stdout.strip().splitlines()[-1])
            except (ValueError, IndexError) as exc:
                errors.append(f"{exc}: {stderr[-800:]}")
                continue
            firsts.append(round(result["time_to_first_call_s"], 3))
            for k, v in result["hypatia_counters"].items():
                counters[k] = counters.get(k, 0) + v
        row |= {"per_process_first_call_s": firsts, "client_counters": counters}
        if errors:
            row["error"] = f"{len(errors)} of {n} processes failed; first: {errors[0]}"
        stats_proc = run_module(env, "hypatia.daemon.ctl", "stats", "--json")
        if stats_proc.returncode != 0:
            raise RuntimeError(f"hypatia-ctl stats exited {stats_proc.returncode}: {stats_proc.stderr[-800:]}")
        stats = json.loads(stats_proc.stdout)
        cache = stats["plan_cache"]
        row |= {
            "plans_made": cache["plans_made"], "graphs": stats["graphs"],
            "planned_per_graph": round(cache["plans_made"] / stats["graphs"], 3) if stats["graphs"] else None,
            "coalesced": cache["coalesced"], "hits": cache["hits"], "misses": cache["misses"],
            "daemon_fallbacks": stats.get("fallbacks"), "daemon_errors": stats.get("error_total"),
        }
    except Exception as exc:  # noqa: BLE001 - one failed group must not end the section
        row["error"] = "; ".join(filter(None, [row.get("error"), f"{type(exc).__name__}: {exc}"]))
    finally:
        if daemon_pid(home) is not None:
            stopped = run_module(env, "hypatia.daemon", "stop")
            if stopped.returncode != 0:
                row["error"] = "; ".join(filter(None, [row.get("error"), f"hypatiad stop failed: {stopped.stderr[-300:]}"]))
        shutil.rmtree(home, ignore_errors=True)
    return row


def run(device: str, quick: bool, budget_s: float) -> dict:
    """Measure N concurrent processes (and the 1-process baseline) against one cold daemon each."""
    from benchmarks.workloads import by_name

    started = time.monotonic()
    workload = "transformer_block" if device == "cuda" and not quick else "mlp_small"
    batch = by_name(workload).batch_for(device, quick=quick)
    params = {"workload": workload, "batch": batch, "device": device}
    timeout = 600  # a guard against hung processes, never a measure of a slow machine
    notes = [
        f"workload {workload} at batch {batch} on {device}, training (forward + backward), backend hypatia; "
        "each group gets a fresh HYPATIA_HOME and a daemon started before its processes; wall_s runs from "
        "launching the first process to the last one exiting (interpreter start and torch import included)",
    ]
    rows, one = [], None
    for n in (1, *(QUICK_COUNTS if quick else COUNTS)):
        row = {"processes": n, "workload": workload, "device": device, "batch": batch, "mode": "training"}
        if time.monotonic() - started > budget_s:
            rows.append(row | {"skipped": "time budget"})
            continue
        row |= run_group(n, params, timeout)
        if n == 1 and "error" not in row:
            one = row.get("wall_s")
        row["wall_vs_one"] = round(row["wall_s"] / one, 3) if one and row.get("wall_s") else None
        if row.get("planned_per_graph") not in (None, 1.0):
            notes.append(f"{n} processes: planned_per_graph = {row['planned_per_graph']}, not 1.0 "
                         f"({row['plans_made']} plans for {row['graphs']} graphs)")
        if row.get("client_counters", {}).get("local_plans"):
            notes.append(f"{n} processes: {row['client_counters']['local_plans']} graphs were planned in-process, "
                         "not by the daemon")
        rows.append(row)
    if one is None:
        notes.append("the 1-process baseline did not complete, so wall_vs_one is missing")
    return {"rows": rows, "notes": notes}
