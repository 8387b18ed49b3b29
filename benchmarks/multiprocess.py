"""N processes compiling the same model at once: against one cold hypatiad, and with plain Inductor.

The questions: does the daemon plan each graph once however many processes ask for it at the same
moment (``planned_per_graph`` 1.0), does Inductor compile each graph once (``compiles_per_graph``
1.0, as many compiles as one process makes), and what does that cost in wall time against one
process. Each Hypatia process has an empty Inductor cache of its own, like ranks on separate
containers, so only the daemon can share a compile between them; the Inductor processes share
one local cache directory, which is all Inductor has to share.
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

from benchmarks.compile_sharing import CLIENT_COUNTERS, absent_notes, client_counters
from benchmarks.fresh_process import base_env as clean_env, daemon_pid
from benchmarks.rows import append_row

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("hypatia", "inductor")
COUNTS = {"hypatia": (1, 2, 4, 8), "inductor": (1, 2, 4, 8)}
# --quick, a smoke run CI makes, leaves out the 1-process baselines: cold compiles that only
# wall_vs_one needs (compiles_per_graph is read from the processes' own counters), so 2 processes
# sharing one compile is what it checks.
QUICK_COUNTS = {"hypatia": (2,), "inductor": ()}

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
    compiled = torch.compile(model, backend=p["backend"])
    loss_of(compiled(*inputs)).backward()
    sync()
    elapsed = time.perf_counter() - start
    from torch._dynamo.utils import counters
    caches = {k: v for g in ("inductor", "aot_autograd") for k, v in counters[g].items() if "cache" in k}
    result = {"pid": os.getpid(), "time_to_first_call_s": elapsed, "cache_counters": caches}
    if p["backend"] == "hypatia":
        from hypatia.client.backend import session
        result["hypatia_counters"] = dict(session().counters)
    print(json.dumps(result))
    """
)


def base_env(home: Path) -> dict:
    """first_call's clean environment, with this run's HYPATIA_HOME and Inductor cache."""
    # Keep Dynamo's own files out of the user's default /tmp/torchinductor_$USER.
    return clean_env() | {"HYPATIA_HOME": str(home), "TORCHINDUCTOR_CACHE_DIR": str(home / "inductor")}


def cache_env(cache: Path) -> dict:
    """The variables that give a process the Inductor (and Triton) cache ``cache``."""
    return {"TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}


def run_module(env: dict, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m <argv>`` in the repository with ``env``, output captured."""
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_children(envs: list[dict], params: dict, home: Path, timeout: float) -> dict:
    """Start one child per environment at once and wait for all; their wall time, first calls,
    summed counters and the per-process Inductor graph count, or an ``error`` naming the failures."""
    # Children write to files, not pipes: n processes' stderr could fill a pipe nobody reads yet.
    logs = [(open(home / f"out{i}", "w+"), open(home / f"err{i}", "w+")) for i in range(len(envs))]
    argv = [sys.executable, "-c", CHILD_CODE, json.dumps(params)]
    t0 = time.perf_counter()
    # Each in a session of its own, so a timeout ends its compile workers too.
    procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=o, stderr=e, start_new_session=True)
             for env, (o, e) in zip(envs, logs)]
    deadline = t0 + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    row: dict = {"wall_s": round(time.perf_counter() - t0, 3)}
    firsts, errors, counters, inductor, graphs = [], [], {}, {}, 0
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
        for total, part in ((counters, result.get("hypatia_counters", {})), (inductor, result["cache_counters"])):
            for k, v in part.items():
                total[k] = total.get(k, 0) + v
        # every process compiles the same graphs: what one of them looked up is the model's count
        c = result["cache_counters"]
        graphs = max(graphs, c.get("fxgraph_cache_hit", 0) + c.get("fxgraph_cache_miss", 0))
    row |= {"per_process_first_call_s": firsts, "inductor_counters": inductor, "inductor_graphs": graphs,
            "compiles_per_graph": round(inductor.get("fxgraph_cache_miss", 0) / graphs, 3) if graphs else None}
    if params["backend"] == "hypatia":
        row["client_counters"] = counters
    if errors:
        row["error"] = f"{len(errors)} of {len(envs)} processes failed; first: {errors[0]}"
    return row


def daemon_figures(env: dict, client: dict[str, int]) -> dict:
    """What the group's daemon counted (``hypatia-ctl stats --json``), with the artifacts its
    processes counted (``client``: their summed session counters)."""
    stats_proc = run_module(env, "hypatia.daemon.ctl", "stats", "--json")
    if stats_proc.returncode != 0:
        raise RuntimeError(f"hypatia-ctl stats exited {stats_proc.returncode}: {stats_proc.stderr[-800:]}")
    stats = json.loads(stats_proc.stdout)
    cache, graphs = stats["plan_cache"], stats["graphs"]
    artifacts = client_counters(client)
    row = {
        "plans_made": cache["plans_made"], "graphs": graphs,
        "planned_per_graph": round(cache["plans_made"] / graphs, 3) if graphs else None,
        "coalesced": cache["coalesced"], "hits": cache["hits"], "misses": cache["misses"],
        "daemon_fallbacks": stats.get("fallbacks"), "daemon_errors": stats.get("error_total"),
        "artifacts": artifacts, "daemon_artifacts": stats.get("artifacts"),
    }
    if artifacts is not None and graphs:
        row["artifacts_compiled_per_graph"] = round(artifacts["artifacts_compiled"] / graphs, 3)
    return row


def run_group(n: int, params: dict, timeout: float) -> dict:
    """``n`` processes of ``params["backend"]`` at once in a fresh scratch directory: Hypatia's
    against a cold daemon started there, each with an empty Inductor cache of its own; Inductor's
    sharing one empty cache directory."""
    # Short on purpose: the daemon's ipc socket path lives under it and must fit in 107 bytes.
    home = Path(tempfile.mkdtemp(prefix="hyb-", dir="/tmp"))
    hypatia = params["backend"] == "hypatia"
    env = base_env(home)
    row: dict = {}
    try:
        if hypatia:
            started = run_module(env, "hypatia.daemon", "start")
            if started.returncode != 0:
                raise RuntimeError(f"hypatiad start exited {started.returncode}: "
                                   f"{(started.stderr or started.stdout)[-800:]}")
            envs = [env | cache_env(home / f"inductor{i}") for i in range(n)]
        else:
            envs = [clean_env() | cache_env(home / "inductor")] * n
        row |= run_children(envs, params, home, timeout)
        if hypatia and row["per_process_first_call_s"]:
            row |= daemon_figures(env, row["client_counters"])
    except Exception as exc:  # noqa: BLE001 - one failed group must not end the section
        row["error"] = "; ".join(filter(None, [row.get("error"), f"{type(exc).__name__}: {exc}"]))
    finally:
        if daemon_pid(home) is not None:
            stopped = run_module(env, "hypatia.daemon", "stop")
            if stopped.returncode != 0:
                row["error"] = "; ".join(filter(None, [row.get("error"), f"hypatiad stop failed: {stopped.stderr[-300:]}"]))
        shutil.rmtree(home, ignore_errors=True)
    return row


def _notes(row: dict) -> list[str]:
    """What a measured group did other than share every compile."""
    n, backend, notes = row["processes"], row["backend"], []
    if row.get("planned_per_graph") not in (None, 1.0):
        notes.append(f"{n} hypatia processes: planned_per_graph = {row['planned_per_graph']}, not 1.0 "
                     f"({row['plans_made']} plans for {row['graphs']} graphs)")
    if row.get("client_counters", {}).get("local_plans"):
        notes.append(f"{n} hypatia processes: {row['client_counters']['local_plans']} graphs were planned in-process, "
                     "not by the daemon")
    if backend == "hypatia" and n > 1 and row.get("compiles_per_graph") not in (None, 1.0):
        notes.append(f"{n} hypatia processes: Inductor compiled each graph {row['compiles_per_graph']} times "
                     f"({row['inductor_counters'].get('fxgraph_cache_miss', 0)} FX graph cache misses for "
                     f"{row['inductor_graphs']} graphs a process compiles)")
    return notes


def run(device: str, quick: bool, budget_s: float, progress=None) -> dict:
    """Measure N concurrent processes (and the 1-process baseline) of each backend: Hypatia
    against one cold daemon each group, Inductor sharing one cache directory each group.
    ``progress`` (a path) gets each row as a JSON line as it is measured."""
    from benchmarks.workloads import by_name

    started = time.monotonic()
    workload = "transformer_block" if device == "cuda" and not quick else "mlp_small"
    batch = by_name(workload).batch_for(device, quick=quick)
    timeout = 600  # a guard against hung processes, never a measure of a slow machine
    notes = [
        f"workload {workload} at batch {batch} on {device}, training (forward + backward); wall_s runs from "
        "launching the first process to the last one exiting (interpreter start and torch import included)",
        "hypatia: each group gets a fresh HYPATIA_HOME and a daemon started before its processes, and each process an "
        "empty Inductor cache of its own (so only the daemon shares); inductor: each group's processes share one "
        "empty local cache directory",
        "compiles_per_graph: Inductor's FX graph cache misses summed over the processes, over the graphs one process "
        "compiles (its FX graph hits + misses; forward and backward count apart): 1.0 is one compile per graph for "
        "the whole group, N is every process compiling everything; artifacts_compiled_per_graph: the processes' "
        "artifacts_compiled summed, over the daemon's distinct graphs; client counters are summed over the processes: "
        + ", ".join(CLIENT_COUNTERS),
    ]
    rows, one = [], {}
    for backend in BACKENDS:
        for n in (QUICK_COUNTS if quick else COUNTS)[backend]:
            row = {"backend": backend, "processes": n, "workload": workload, "device": device, "batch": batch,
                   "mode": "training"}
            if time.monotonic() - started > budget_s:
                rows.append(row | {"skipped": "time budget"})
                continue
            row |= run_group(n, {"workload": workload, "batch": batch, "device": device, "backend": backend}, timeout)
            if n == 1 and "error" not in row:
                one[backend] = row.get("wall_s")
            base = one.get(backend)
            row["wall_vs_one"] = round(row["wall_s"] / base, 3) if base and row.get("wall_s") else None
            notes += _notes(row)
            rows.append(row)
            append_row(progress, row)
    counts = QUICK_COUNTS if quick else COUNTS
    for backend in BACKENDS:
        if backend not in one:
            done = "did not complete" if 1 in counts[backend] else "was not measured (--quick)"
            notes.append(f"the 1-process {backend} baseline {done}, so its wall_vs_one is missing")
    notes += absent_notes([r for r in rows if "skipped" not in r], lambda r: f"{r['backend']} x{r['processes']}")
    return {"rows": rows, "notes": notes}
