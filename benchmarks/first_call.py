"""Time to first call: each model compiled by several backends and caches, each in a fresh process.

Every measurement runs in its own Python subprocess so that nothing (imports, Dynamo state,
in-memory caches) carries over; the child prints one JSON line with its own timings. On a GPU
the models are GPT-2 small and BERT-base in bfloat16 (the issue's comparison: Hypatia's default
first compile against Inductor's cold compile) and the hand-written transformer block in float32
with every configuration; on a CPU the transformer block (``--quick``: the small MLP).
"""

from __future__ import annotations

import importlib.util
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("inference", "training")
# The order of the table.
CONFIGS = ("eager_backend", "aot_eager", "inductor_cold", "inductor_warm", "inductor_ro_cold", "inductor_redis_warm",
           "hypatia_cold", "hypatia_warm")
# The order of the runs: the comparison (Hypatia's default first compile, a second
# process, Inductor cold) for every workload first, so that a tight budget skips the rest.
RUN_PASSES = (("hypatia_cold", "hypatia_warm", "inductor_cold"),
              ("inductor_warm", "inductor_ro_cold", "eager_backend", "aot_eager", "inductor_redis_warm"))
# workload -> (dtype, the configurations measured on it)
GPU_WORKLOADS = {
    "gpt2_small": ("bfloat16", ("inductor_cold", "inductor_warm", "inductor_ro_cold", "hypatia_cold", "hypatia_warm")),
    "bert_base": ("bfloat16", ("inductor_cold", "inductor_warm", "inductor_ro_cold", "hypatia_cold", "hypatia_warm")),
    "transformer_block": ("float32", CONFIGS),
}
CPU_WORKLOADS = {"transformer_block": ("float32", CONFIGS)}
QUICK_WORKLOADS = {"mlp_small": ("float32", ("eager_backend", "aot_eager", "hypatia_cold", "hypatia_warm"))}
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
Case = tuple[str, str]  # (workload, mode)

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
    if training:
        loss_of(compiled(*inputs)).backward()
    else:
        with torch.no_grad():
            compiled(*inputs)
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
    print(json.dumps(result))
    """
)


class ChildFailed(Exception):
    """A measuring subprocess exited badly, timed out or printed no JSON."""


def base_env() -> dict:
    """The parent's environment without settings that would steer caches or the daemon."""
    drop = ("HYPATIA_", "TORCHINDUCTOR_", "TRITON_", "TORCH_COMPILE_")
    # the client's patience is kept: a --quick run waits for the daemon however busy the machine
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) or k == "HYPATIA_TIMEOUT_MS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def run_child(code: str, params: dict, env: dict, timeout: float) -> dict:
    """Run ``code`` in a fresh interpreter and return its last stdout line as JSON, plus its wall time."""
    start = time.perf_counter()
    # A session of its own, so a timeout also ends the compile workers it forked, which would
    # otherwise hold its pipes open (a daemon it autostarts lives in yet another session).
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(params)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise ChildFailed(f"timed out after {timeout:.0f} s; stderr: {stderr[-800:]}") from None
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise ChildFailed(f"exit {proc.returncode}: {stderr[-800:]}")
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise ChildFailed(f"no JSON line on stdout ({stdout[-200:]!r}); stderr: {stderr[-800:]}") from None
    return result | {"total_process_s": round(total, 3)}


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
        self.tag = uuid.uuid4().hex[:12]
        self._redis_problem: str | None | bool = False  # False: not checked yet

    def child(self, backend: str, case: Case, extra_env: dict, cache_dir: Path | None = None,
              compile_mode: str | None = None) -> dict:
        # Every child gets its own Inductor cache unless it is meant to share one, so no
        # measurement sees what another left in the default /tmp/torchinductor_$USER.
        cache_dir = cache_dir or Path(tempfile.mkdtemp(prefix="c", dir=self.scratch))
        env = base_env() | {"TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "TRITON_CACHE_DIR": str(cache_dir / "triton")}
        workload, mode = case
        params = {"backend": backend, "mode": mode, "workload": workload, "batch": self.batch[workload],
                  "device": self.device, "dtype": self.workloads[workload][0], "compile_mode": compile_mode}
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
        row = self.child("hypatia", case, {"HYPATIA_HOME": str(home)}, cache)
        self.hypatia_cold_time[case] = row["time_to_first_call_s"]
        counters = row.get("hypatia_counters", {})
        asked = counters.get("daemon_hits", 0) + counters.get("daemon_misses", 0)
        from_daemon = counters.get("local_plans", 0) == 0 and asked > 0
        if not from_daemon:
            self.notes.append(f"hypatia_cold/{case[0]}/{case[1]}: plans did not come from the daemon: {counters}")
        return row | {"plans_from_daemon": from_daemon, "daemon_autostarted": daemon_pid(home) is not None}

    def hypatia_warm(self, case: Case) -> dict:
        """A second process right after the first: the same daemon and the same Inductor cache."""
        home = self.homes.get(case)
        if home is None or daemon_pid(home) is None:
            raise RuntimeError("the daemon of the hypatia_cold run is not running")
        try:
            row = self.child("hypatia", case, {"HYPATIA_HOME": str(home)}, self.hypatia_cache[case])
        finally:
            self.stop_daemon(case)  # its background tuning must not compete with the next runs
        counters = row.get("hypatia_counters", {})
        if counters.get("daemon_hits", 0) == 0:
            self.notes.append(f"hypatia_warm/{case[0]}/{case[1]}: daemon_hits == 0, the warm process got no plan "
                              f"from the daemon's cache: {counters}")
        if _hits(row.get("cache_counters", {})) == 0:
            self.notes.append(f"hypatia_warm/{case[0]}/{case[1]}: no Inductor cache hit ({row.get('plans_tuned')} of "
                              "its plans tuned since the cold run, which changes the graph Inductor compiles)")
        cold = self.hypatia_cold_time.get(case)
        if cold:
            row["vs_cold"] = round(row["time_to_first_call_s"] / cold, 3)
        return row | {"plans_from_daemon": counters.get("local_plans", 0) == 0 and counters.get("daemon_hits", 0) > 0,
                      "populated_by": "hypatia_cold"}

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
        home = self.homes.get(case)
        if home is None or daemon_pid(home) is None:
            return
        env = base_env() | {"HYPATIA_HOME": str(home)}
        proc = subprocess.run([sys.executable, "-m", "hypatia.daemon", "stop"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            self.notes.append(f"could not stop the hypatiad of {case[0]}/{case[1]} ({home}): {proc.stderr[-300:]}")

    def cleanup(self) -> None:
        """Stop the daemons the cold runs started and remove the scratch directory."""
        for case in self.homes:
            self.stop_daemon(case)
        shutil.rmtree(self.scratch, ignore_errors=True)


def _local_cache_env() -> dict:
    # Already the default since torch 2.4; explicit so a changed default cannot make "warm" cold.
    return {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


def daemon_pid(home: Path) -> int | None:
    """The pid of the hypatiad serving ``home``, or None."""
    from hypatia.config import load, read_daemon_pid

    return read_daemon_pid(load({"HYPATIA_HOME": str(home)}))


def workloads_for(device: str, quick: bool, only: list[str] | None = None) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The workloads measured on ``device`` (those in ``only``, in its order, if given), each with
    its dtype and configurations."""
    chosen = QUICK_WORKLOADS if quick else GPU_WORKLOADS if device == "cuda" else CPU_WORKLOADS
    return {n: chosen[n] for n in ([n for n in only if n in chosen] if only else chosen)}


def run(device: str, quick: bool, budget_s: float, only: list[str] | None = None,
        modes: list[str] | None = None) -> dict:
    """Measure time to first call for every workload, configuration and mode; rows past
    ``budget_s`` are skipped. ``only`` narrows the workloads, ``modes`` the modes."""
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
                    for config in configs:
                        if config in measured:
                            rows[workload, config, mode] = bench.measure(config, (workload, mode), started, budget_s)
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
    ]
    names = list(workloads)
    ordered = sorted(rows, key=lambda k: (names.index(k[0]), CONFIGS.index(k[1]), MODES.index(k[2])))
    return {"rows": [rows[k] for k in ordered], "notes": notes}
