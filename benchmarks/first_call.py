"""Time to first call: each model compiled by several backends and caches, each in a fresh process.

Every measurement runs in its own Python subprocess so that nothing (imports, Dynamo state,
in-memory caches) carries over; the child prints one JSON line with its own timings. On a GPU
the models are GPT-2 small and BERT-base in bfloat16 (the issue's comparisons: Hypatia's default
first compile against Inductor's cold compile, and a process that only the daemon can make warm
against Inductor's warm cache and Dynamo alone) and the hand-written transformer block in float32
with every configuration; on a CPU the transformer block (``--quick``: the small MLP).

Only the daemon can make ``hypatia_daemon_warm`` and ``hypatia_new_host`` warm: each starts with
an empty Inductor cache, against the daemon the ``hypatia_cold`` run filled (once it is idle) or
a fresh daemon, with a runtime directory of its own, on a copy of that daemon's store.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

from benchmarks.compile_sharing import (absent_notes, client_counters, copy_store, daemon_artifacts, inductor_counters,
                                        store_path)
from benchmarks.fresh_process import ChildFailed, base_env, daemon_pid, hypatiad, run_child
from benchmarks.rows import append_row

MODES = ("inference", "training")
# The order of the table.
CONFIGS = ("eager_backend", "aot_eager", "inductor_cold", "inductor_warm", "inductor_ro_cold", "inductor_redis_warm",
           "hypatia_cold", "hypatia_warm", "hypatia_daemon_warm", "hypatia_new_host")
# The order of the runs: the comparisons (Hypatia's default first compile, a second
# process, the processes only the daemon makes warm, Inductor cold, warm and from Redis, Dynamo alone) for
# every workload first, so that a tight budget skips the rest.
RUN_PASSES = (("hypatia_cold", "hypatia_warm", "hypatia_daemon_warm", "hypatia_new_host", "inductor_cold",
               "inductor_warm", "eager_backend", "inductor_redis_warm"),
              ("inductor_ro_cold", "aot_eager"))
# The configurations that use the hypatia_cold run's daemon; it is stopped after a case's last.
ON_COLD_DAEMON = frozenset({"hypatia_cold", "hypatia_warm", "hypatia_daemon_warm", "hypatia_new_host"})
SHARED = ("eager_backend", "inductor_cold", "inductor_warm", "inductor_ro_cold", "inductor_redis_warm", "hypatia_cold",
          "hypatia_warm", "hypatia_daemon_warm", "hypatia_new_host")
# workload -> (dtype, the configurations measured on it)
GPU_WORKLOADS = {
    "gpt2_small": ("bfloat16", SHARED),
    "bert_base": ("bfloat16", SHARED),
    "transformer_block": ("float32", CONFIGS),
}
CPU_WORKLOADS = {"transformer_block": ("float32", CONFIGS)}
QUICK_WORKLOADS = {"mlp_small": ("float32", ("eager_backend", "aot_eager", "hypatia_cold", "hypatia_warm",
                                             "hypatia_daemon_warm", "hypatia_new_host"))}
# --quick, a smoke run CI makes, measures Hypatia in training alone (forward and backward: both of
# Inductor's caches), where each process costs a cold Inductor compile until the daemon serves
# artifacts; the eager and aot_eager floors, cheap, in both modes.
QUICK_MODES = {config: ("training",) for config in
               ("hypatia_cold", "hypatia_warm", "hypatia_daemon_warm", "hypatia_new_host")}
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
Case = tuple[str, str]  # (workload, mode)
# Calls the cold Hypatia process makes after its timed first call, as a job would: enough for the
# executor choice (3 warm-up and 10 timed calls for each of at most six candidates) to be measured
# and stored, so that later processes start from it.
SETTLE_CALLS = 80

CHILD_CODE = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    import torch
    import_s = time.perf_counter() - t0
    from benchmarks.workloads import by_name, loss_of

    p = json.loads(sys.argv[1])
    w, dev, dtype = by_name(p["workload"]), torch.device(p["device"]), getattr(torch, p["dtype"])
    torch.manual_seed(0)
    model = w.build().to(dev, dtype)
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in w.make_inputs(p["batch"], dev, torch.float32))
    training = p["mode"] == "training"
    model.train(training)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    if p["backend"] != "inductor":
        kwargs = {"backend": p["backend"]}
    else:
        kwargs = {"mode": p["compile_mode"]} if p.get("compile_mode") else {}
    start = time.perf_counter()
    compiled = torch.compile(model, **kwargs)

    def step():
        if training:
            loss_of(compiled(*inputs)).backward()
        else:
            with torch.no_grad():
                compiled(*inputs)

    step()
    sync()
    result = {"time_to_first_call_s": time.perf_counter() - start, "import_s": import_s}
    if p["backend"] in ("inductor", "hypatia"):
        from torch._dynamo.utils import counters
        result["cache_counters"] = {
            k: v for g in ("inductor", "aot_autograd") for k, v in counters[g].items() if "cache" in k
        }
    if p["backend"] == "hypatia":
        from hypatia.client.backend import session
        result["hypatia_counters"] = dict(session().counters)
        result["plans_tuned"] = sum(plan.tuned for _, plan in session().plans)
    # after the first call, more calls as a job makes them: the executor choice is measured on
    # them and reported, so a later process builds only the chosen executor (not timed)
    for _ in range(p.get("settle_calls", 0)):
        step()
    sync()
    print(json.dumps(result))
    """
)


def redis_problem() -> str | None:
    """Why the Redis remote cache cannot be measured here, or None when it can."""
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            answer = s.recv(64)
    except OSError as exc:
        return f"no Redis server on {REDIS_HOST}:{REDIS_PORT} ({exc})"
    if not answer.startswith(b"+PONG"):
        return f"{REDIS_HOST}:{REDIS_PORT} did not answer PING with +PONG ({answer[:40]!r})"
    if importlib.util.find_spec("redis") is None:
        return "pip install redis (Inductor's remote cache needs the redis package)"
    return None


def _hits(counters: dict) -> int:
    return counters.get("fxgraph_cache_hit", 0) + counters.get("autograd_cache_hit", 0)


class FirstCall:
    """One run of the section: its scratch directory, the state warm configs reuse, its notes."""

    def __init__(self, device: str, quick: bool, workloads: dict[str, tuple[str, tuple[str, ...]]]):
        from benchmarks.workloads import by_name

        self.device, self.quick = device, quick
        self.workloads = workloads
        self.batch = {name: by_name(name).batch_for(device, quick=quick) for name in workloads}
        self.timeout = 600  # a guard against a hung child, never a measure of a slow machine
        # Short on purpose: Hypatia's ipc socket path lives under it and must fit in 107 bytes.
        self.scratch = Path(tempfile.mkdtemp(prefix="hyb-", dir="/tmp"))
        self.notes: list[str] = []
        self.cold_cache: dict[Case, Path] = {}  # the Inductor cache the inductor_cold run filled
        self.cold_time: dict[Case, float] = {}
        self.hypatia_cache: dict[Case, Path] = {}  # the Inductor cache the hypatia_cold run filled
        self.hypatia_cold_time: dict[Case, float] = {}
        self.homes: dict[Case, Path] = {}  # HYPATIA_HOME of the cold daemon
        self.idle_waits: dict[Case, float | None] = {}  # seconds the cold daemon took to become idle
        self.new_hosts: list[Path] = []  # HYPATIA_HOME of each hypatia_new_host daemon
        self.tag = uuid.uuid4().hex[:12]
        self._redis_problem: str | None | bool = False  # False: not checked yet

    def child(self, backend: str, case: Case, extra_env: dict, cache_dir: Path | None = None,
              compile_mode: str | None = None, settle_calls: int = 0) -> dict:
        # Every child gets its own Inductor cache unless it is meant to share one, so no
        # measurement sees what another left in the default /tmp/torchinductor_$USER.
        cache_dir = cache_dir or Path(tempfile.mkdtemp(prefix="c", dir=self.scratch))
        env = base_env() | {"TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "TRITON_CACHE_DIR": str(cache_dir / "triton")}
        workload, mode = case
        params = {"backend": backend, "mode": mode, "workload": workload, "batch": self.batch[workload],
                  "device": self.device, "dtype": self.workloads[workload][0], "compile_mode": compile_mode,
                  "settle_calls": settle_calls}
        return run_child(CHILD_CODE, params, env | extra_env, self.timeout)

    # -- configurations: each returns the fields of one row ---------------------------------
    def eager_backend(self, case: Case) -> dict:
        return self.child("eager", case, {})

    def aot_eager(self, case: Case) -> dict:
        return self.child("aot_eager", case, {})

    def inductor_cold(self, case: Case) -> dict:
        cache = Path(tempfile.mkdtemp(prefix="i", dir=self.scratch))
        row = self.child("inductor", case, _local_cache_env(), cache)
        # The cold run is also the populating run of inductor_warm: same config, same cache dir.
        self.cold_cache[case], self.cold_time[case] = cache, row["time_to_first_call_s"]
        return row | {"cache_dir_was_empty": True}

    def inductor_warm(self, case: Case) -> dict:
        if case not in self.cold_cache:
            raise RuntimeError("needs the cache of the inductor_cold run, which did not complete")
        row = self.child("inductor", case, _local_cache_env(), self.cold_cache[case])
        self._check_warm("inductor_warm", case, row)
        return row | {"populated_by": "inductor_cold"}

    def inductor_ro_cold(self, case: Case) -> dict:
        cache = Path(tempfile.mkdtemp(prefix="o", dir=self.scratch))
        row = self.child("inductor", case, _local_cache_env(), cache, compile_mode="reduce-overhead")
        return row | {"cache_dir_was_empty": True, "compile_mode": "reduce-overhead"}

    def inductor_redis_warm(self, case: Case) -> dict:
        # A tag of our own keeps this run's keys apart from earlier runs' without flushing Redis.
        tag = f"hypatia-bench-{self.tag}-{case[0]}-{case[1]}"
        env = _local_cache_env() | {
            "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE": "1",
            "TORCHINDUCTOR_REDIS_HOST": REDIS_HOST, "TORCHINDUCTOR_REDIS_PORT": str(REDIS_PORT),
            "TORCH_COMPILE_CACHE_KEY_TAG": tag,
        }
        populate = self.child("inductor", case, env)
        local = Path(tempfile.mkdtemp(prefix="r", dir=self.scratch))
        row = self.child("inductor", case, env, local)  # another empty local cache: any hit is remote
        self._check_warm("inductor_redis_warm", case, row)
        # The remote entry holds generated code; shared objects in the empty local cache were built here.
        built = sum(1 for f in local.rglob("*.so") if "triton" not in f.parts)
        if built and row.get("vs_cold", 0) > 0.5:
            self.notes.append(f"inductor_redis_warm/{case[0]}/{case[1]}: hit the remote cache but compiled {built} "
                              "shared objects into its empty local cache (Inductor's remote entry carries C++ source, "
                              "not the built .so), so it saves little over cold")
        return row | {"cache_key_tag": tag, "populate_s": populate["time_to_first_call_s"],
                      "local_so_built": built, "populate_cache_counters": populate.get("cache_counters")}

    def hypatia_cold(self, case: Case) -> dict:
        """The default first compile: no daemon running (the child starts one) and an empty Inductor cache."""
        home = Path(tempfile.mkdtemp(prefix="h", dir=self.scratch))
        cache = Path(tempfile.mkdtemp(prefix="j", dir=self.scratch))
        self.homes[case], self.hypatia_cache[case] = home, cache
        row = self.child("hypatia", case, {"HYPATIA_HOME": str(home)}, cache, settle_calls=SETTLE_CALLS)
        self.hypatia_cold_time[case] = row["time_to_first_call_s"]
        counters = row.get("hypatia_counters", {})
        asked = counters.get("daemon_hits", 0) + counters.get("daemon_misses", 0)
        from_daemon = counters.get("local_plans", 0) == 0 and asked > 0
        if not from_daemon:
            self.notes.append(f"hypatia_cold/{case[0]}/{case[1]}: plans did not come from the daemon: {counters}")
        return row | {"plans_from_daemon": from_daemon, "daemon_autostarted": daemon_pid(home) is not None,
                      "artifacts": client_counters(counters)} | self._daemon_artifacts("hypatia_cold", case, home)

    def hypatia_warm(self, case: Case) -> dict:
        """A second process right after the first: the same daemon and the same Inductor cache."""
        home = self.cold_daemon(case)
        row = self.child("hypatia", case, {"HYPATIA_HOME": str(home)}, self.hypatia_cache[case])
        counters = row.get("hypatia_counters", {})
        # Served by the daemon either way: a plan from its cache, or (once the cold process's
        # compiled code has landed there) a warm start that asks for no plan at all.
        served = counters.get("daemon_hits", 0) + counters.get("warm_starts", 0)
        if served == 0:
            self.notes.append(f"hypatia_warm/{case[0]}/{case[1]}: no daemon hit and no warm start, the warm process "
                              f"got nothing from the daemon's cache: {counters}")
        if _hits(row.get("cache_counters", {})) == 0:
            self.notes.append(f"hypatia_warm/{case[0]}/{case[1]}: no Inductor cache hit ({row.get('plans_tuned')} of "
                              "its plans tuned since the cold run, which changes the graph Inductor compiles)")
        cold = self.hypatia_cold_time.get(case)
        if cold:
            row["vs_cold"] = round(row["time_to_first_call_s"] / cold, 3)
        return row | {"plans_from_daemon": counters.get("local_plans", 0) == 0 and served > 0,
                      "populated_by": "hypatia_cold", "artifacts": client_counters(counters)}

    def hypatia_daemon_warm(self, case: Case) -> dict:
        """A later process with an empty Inductor cache against the hypatia_cold run's daemon,
        once that daemon is idle: only what the daemon keeps can make it warm."""
        home = self.cold_daemon(case)
        waited = self.settle(case)
        row = self.child("hypatia", case, {"HYPATIA_HOME": str(home)})
        return row | self._shared("hypatia_daemon_warm", case, row, home) | {
            "daemon_idle_wait_s": waited, "populated_by": "hypatia_cold", "cache_dir_was_empty": True}

    def hypatia_new_host(self, case: Case) -> dict:
        """A new host sharing the store another daemon filled: a fresh daemon (a HYPATIA_HOME, so
        a runtime directory, of its own) on a copy of the hypatia_cold daemon's store, started
        before the process, and an empty Inductor cache."""
        source = self.homes.get(case)
        if source is None:
            raise RuntimeError("needs the store of the hypatia_cold run, which did not complete")
        waited = self.settle(case) if daemon_pid(source) is not None else self.idle_waits.get(case)
        self.stop_daemon(case)  # stopped, it has drained: everything it kept is in its store
        home = Path(tempfile.mkdtemp(prefix="n", dir=self.scratch))
        self.new_hosts.append(home)
        copied = copy_store(store_path(source), store_path(home))
        started = hypatiad("start", home)
        if started.returncode != 0:
            raise RuntimeError(f"hypatiad start on the copied store exited {started.returncode}: "
                               f"{(started.stderr or started.stdout)[-600:]}")
        try:
            row = self.child("hypatia", case, {"HYPATIA_HOME": str(home)})
            shared = self._shared("hypatia_new_host", case, row, home)
        finally:
            self._stop(home, f"the new-host daemon of {case[0]}/{case[1]}")
        return row | shared | {"daemon_idle_wait_s": waited, "store_copied_bytes": copied,
                               "populated_by": "hypatia_cold", "cache_dir_was_empty": True}

    def cold_daemon(self, case: Case) -> Path:
        """The HYPATIA_HOME of the hypatia_cold run's daemon, which must still be running."""
        home = self.homes.get(case)
        if home is None or daemon_pid(home) is None:
            raise RuntimeError("the daemon of the hypatia_cold run is not running")
        return home

    def settle(self, case: Case) -> float | None:
        """Wait (once per case) until the hypatia_cold daemon plans and tunes nothing, as a later
        process on the host would find it; the seconds waited, None where it did not settle."""
        if case not in self.idle_waits:
            from benchmarks.hypatia_runs import DaemonNotIdle, wait_for_daemon
            from hypatia.config import load

            try:
                self.idle_waits[case] = wait_for_daemon(config=load({"HYPATIA_HOME": str(self.homes[case])}))
            except DaemonNotIdle as exc:
                self.idle_waits[case] = None
                self.notes.append(f"{case[0]}/{case[1]}: the hypatia_cold daemon was still busy when the later "
                                  f"processes ran: {exc}")
        return self.idle_waits[case]

    def _daemon_artifacts(self, config: str, case: Case, home: Path) -> dict:
        try:
            return {"daemon_artifacts": daemon_artifacts(home)}
        except Exception as exc:  # noqa: BLE001 - a figure missing, not the row
            self.notes.append(f"{config}/{case[0]}/{case[1]}: could not read the daemon's stats: {exc}")
            return {}

    def _shared(self, config: str, case: Case, row: dict, home: Path) -> dict:
        """The fields (and notes) of a row only the daemon could make warm: what the process loaded,
        what Inductor's caches hit, and what the daemon counted."""
        artifacts = client_counters(row.get("hypatia_counters", {}))
        inductor = inductor_counters(row.get("cache_counters", {}))
        name = f"{config}/{case[0]}/{case[1]}"
        if artifacts is not None and artifacts["artifacts_loaded"] + artifacts["warm_starts"] == 0:
            self.notes.append(f"{name}: loaded no artifacts from the daemon and skipped no trace: {artifacts}")
        if _hits(inductor) == 0:
            self.notes.append(f"{name}: no FX graph or AOTAutograd cache hit, Inductor compiled every graph again")
        return {"artifacts": artifacts, "inductor_cache": inductor} | self._daemon_artifacts(config, case, home)

    def _check_warm(self, config: str, case: Case, row: dict) -> None:
        counters = row.get("cache_counters", {})
        if _hits(counters) == 0:
            self.notes.append(f"{config}/{case[0]}/{case[1]}: no FX graph or AOTAutograd cache hit, so it was not "
                              f"warm: {counters}")
        cold = self.cold_time.get(case)
        if cold:
            row["vs_cold"] = round(row["time_to_first_call_s"] / cold, 3)

    # -- the section ------------------------------------------------------------------------
    def measure(self, config: str, case: Case, started: float, budget_s: float) -> dict:
        workload, mode = case
        row = {"config": config, "mode": mode, "workload": workload, "device": self.device,
               "dtype": self.workloads[workload][0], "batch": self.batch[workload]}
        if config == "inductor_redis_warm":
            if self._redis_problem is False:
                self._redis_problem = redis_problem()
            if self._redis_problem:
                return row | {"skipped": self._redis_problem}
        if time.monotonic() - started > budget_s:
            return row | {"skipped": "time budget"}
        try:
            return row | getattr(self, config)(case)
        except Exception as exc:  # noqa: BLE001 - one failed measurement must not end the section
            return row | {"error": str(exc) if isinstance(exc, ChildFailed) else f"{type(exc).__name__}: {exc}"}

    def stop_daemon(self, case: Case) -> None:
        """Stop the hypatia_cold run's daemon of ``case``, if it runs: its background tuning must
        not compete with the runs that follow."""
        if case in self.homes:
            self._stop(self.homes[case], f"the hypatiad of {case[0]}/{case[1]}")

    def _stop(self, home: Path, what: str) -> None:
        if daemon_pid(home) is None:
            return
        proc = hypatiad("stop", home)
        if proc.returncode != 0:
            self.notes.append(f"could not stop {what} ({home}): {proc.stderr[-300:]}")

    def cleanup(self) -> None:
        """Stop the daemons the runs started and remove the scratch directory."""
        for case in self.homes:
            self.stop_daemon(case)
        for home in self.new_hosts:
            self._stop(home, "a new-host daemon")
        shutil.rmtree(self.scratch, ignore_errors=True)


def _local_cache_env() -> dict:
    # Already the default since torch 2.4; explicit so a changed default cannot make "warm" cold.
    return {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


def workloads_for(device: str, quick: bool, only: list[str] | None = None) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The workloads measured on ``device`` (those in ``only``, in its order, if given), each with
    its dtype and configurations."""
    chosen = QUICK_WORKLOADS if quick else GPU_WORKLOADS if device == "cuda" else CPU_WORKLOADS
    return {n: chosen[n] for n in ([n for n in only if n in chosen] if only else chosen)}


def run(device: str, quick: bool, budget_s: float, only: list[str] | None = None,
        modes: list[str] | None = None, progress=None) -> dict:
    """Measure time to first call for every workload, configuration and mode; rows past
    ``budget_s`` are skipped. ``only`` narrows the workloads, ``modes`` the modes; ``progress`` (a
    path) gets each row as a JSON line as it is measured, so a run cut short keeps what it made."""
    from benchmarks.workloads import by_name

    started = time.monotonic()
    workloads, missing = {}, []
    for name, spec in workloads_for(device, quick, only).items():
        needs = by_name(name).requires
        if needs is None or importlib.util.find_spec(needs) is not None:
            workloads[name] = spec
        else:
            missing.append(f"{name}: skipped, needs `{needs}` (pip install -e '.[bench]')")
    bench = FirstCall(device, quick, workloads)
    rows: dict[tuple[str, str, str], dict] = {}
    try:
        for configs in RUN_PASSES:
            for workload, (_, measured) in workloads.items():
                for mode in (m for m in MODES if modes is None or m in modes):
                    chosen = [c for c in configs if c in measured and (not quick or mode in QUICK_MODES.get(c, MODES))]
                    for i, config in enumerate(chosen):
                        rows[workload, config, mode] = bench.measure(config, (workload, mode), started, budget_s)
                        append_row(progress, rows[workload, config, mode])
                        if not ON_COLD_DAEMON.intersection(chosen[i + 1:]):
                            bench.stop_daemon((workload, mode))
    finally:
        bench.cleanup()
    described = ", ".join(f"{w} ({dt}, batch {bench.batch[w]})" for w, (dt, _) in workloads.items())
    notes = missing + bench.notes + [
        f"{described or 'no workload'} on {device}; each time is one fresh process; time_to_first_call_s runs from "
        "torch.compile() through the first call (and backward in training)",
        "inductor_warm reuses the cache directory that the inductor_cold run filled; inductor_ro_cold is "
        "mode='reduce-overhead' with an empty cache",
        "hypatia_cold is the default first compile: default settings, no daemon running (the process starts one) and "
        "an empty Inductor cache; hypatia_warm is a second process started right after it, with the same daemon and "
        "Inductor cache (where the daemon's background tuning finished in between, it gets the tuned plan)",
        "only the daemon can make these warm, each with an empty Inductor cache: hypatia_daemon_warm is a later "
        "process against the hypatia_cold daemon once it is idle (daemon_idle_wait_s); hypatia_new_host is a new host "
        "sharing the store another daemon filled: a fresh daemon (HYPATIA_HOME and runtime directory of its own) on a "
        "copy of the hypatia_cold daemon's store (SQLite's backup API, after that daemon stopped), started before the "
        "process; the goal for both: no slower than inductor_warm and than 1.2 x eager_backend",
    ]
    notes += absent_notes(list(rows.values()), lambda r: f"{r['config']}/{r['workload']}/{r['mode']}")
    names = list(workloads)
    ordered = sorted(rows, key=lambda k: (names.index(k[0]), CONFIGS.index(k[1]), MODES.index(k[2])))
    return {"rows": [rows[k] for k in ordered], "notes": notes}
