"""Time to first call: one model compiled by several backends and caches, each in a fresh process.

Every measurement runs in its own Python subprocess so that nothing (imports, Dynamo state,
in-memory caches) carries over; the child prints one JSON line with its own timings.
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
CONFIGS = ("eager_backend", "aot_eager", "inductor_cold", "inductor_warm", "inductor_redis_warm",
           "hypatia_cold_daemon", "hypatia_warm_daemon")
# The order of the runs: Hypatia's rows before the slow Inductor ones, so a tight budget skips those.
RUN_ORDER = ("eager_backend", "aot_eager", "hypatia_cold_daemon", "hypatia_warm_daemon",
             "inductor_cold", "inductor_warm", "inductor_redis_warm")
QUICK_CONFIGS = ("eager_backend", "aot_eager", "hypatia_cold_daemon", "hypatia_warm_daemon")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379

CHILD_CODE = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    import torch
    import_s = time.perf_counter() - t0
    from benchmarks.workloads import by_name, loss_of

    p = json.loads(sys.argv[1])
    w, dev = by_name(p["workload"]), torch.device(p["device"])
    torch.manual_seed(0)
    model = w.build().to(dev)
    inputs = w.make_inputs(p["batch"], dev, torch.float32)
    training = p["mode"] == "training"
    model.train(training)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    kwargs = {} if p["backend"] == "inductor" else {"backend": p["backend"]}
    start = time.perf_counter()
    compiled = torch.compile(model, **kwargs)
    if training:
        loss_of(compiled(*inputs)).backward()
    else:
        with torch.no_grad():
            compiled(*inputs)
    sync()
    result = {"time_to_first_call_s": time.perf_counter() - start, "import_s": import_s}
    if p["backend"] == "inductor":
        from torch._dynamo.utils import counters
        result["cache_counters"] = {
            k: v for g in ("inductor", "aot_autograd") for k, v in counters[g].items() if "cache" in k
        }
    if p["backend"] == "hypatia":
        from hypatia.client.backend import session
        result["hypatia_counters"] = dict(session().counters)
    print(json.dumps(result))
    """
)


class ChildFailed(Exception):
    """A measuring subprocess exited badly, timed out or printed no JSON."""


def base_env() -> dict:
    """The parent's environment without settings that would steer caches or the daemon."""
    drop = ("HYPATIA_", "TORCHINDUCTOR_", "TRITON_", "TORCH_COMPILE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
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

    def __init__(self, device: str, quick: bool):
        from benchmarks.workloads import by_name

        self.device, self.quick = device, quick
        self.workload = "mlp_small" if quick else "transformer_block"
        self.batch = by_name(self.workload).batch_for(device, quick=quick)
        self.timeout = 60 if quick else 300
        # Short on purpose: Hypatia's ipc socket path lives under it and must fit in 107 bytes.
        self.scratch = Path(tempfile.mkdtemp(prefix="hyb-", dir="/tmp"))
        self.notes: list[str] = []
        self.cold_cache: dict[str, Path] = {}  # mode -> the Inductor cache the cold run filled
        self.cold_time: dict[str, float] = {}
        self.homes: dict[str, Path] = {}  # mode -> HYPATIA_HOME of the cold daemon
        self.tag = uuid.uuid4().hex[:12]
        self._redis_problem: str | None | bool = False  # False: not checked yet

    def child(self, backend: str, mode: str, extra_env: dict, cache_dir: Path | None = None) -> dict:
        # Every child gets its own Inductor cache unless it is meant to share one, so no
        # measurement sees what another left in the default /tmp/torchinductor_$USER.
        cache_dir = cache_dir or Path(tempfile.mkdtemp(prefix="c", dir=self.scratch))
        env = base_env() | {"TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "TRITON_CACHE_DIR": str(cache_dir / "triton")}
        params = {"backend": backend, "mode": mode, "workload": self.workload, "batch": self.batch, "device": self.device}
        return run_child(CHILD_CODE, params, env | extra_env, self.timeout)

    # -- configurations: each returns the fields of one row ---------------------------------
    def eager_backend(self, mode: str) -> dict:
        return self.child("eager", mode, {})

    def aot_eager(self, mode: str) -> dict:
        return self.child("aot_eager", mode, {})

    def inductor_cold(self, mode: str) -> dict:
        cache = Path(tempfile.mkdtemp(prefix="i", dir=self.scratch))
        row = self.child("inductor", mode, _local_cache_env(), cache)
        # The cold run is also the populating run of inductor_warm: same config, same cache dir.
        self.cold_cache[mode], self.cold_time[mode] = cache, row["time_to_first_call_s"]
        return row | {"cache_dir_was_empty": True}

    def inductor_warm(self, mode: str) -> dict:
        if mode not in self.cold_cache:
            raise RuntimeError("needs the cache of the inductor_cold run, which did not complete")
        row = self.child("inductor", mode, _local_cache_env(), self.cold_cache[mode])
        self._check_warm("inductor_warm", mode, row)
        return row | {"populated_by": "inductor_cold"}

    def inductor_redis_warm(self, mode: str) -> dict:
        # A tag of our own keeps this run's keys apart from earlier runs' without flushing Redis.
        tag = f"hypatia-bench-{self.tag}-{mode}"
        env = _local_cache_env() | {
            "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE": "1",
            "TORCHINDUCTOR_REDIS_HOST": REDIS_HOST, "TORCHINDUCTOR_REDIS_PORT": str(REDIS_PORT),
            "TORCH_COMPILE_CACHE_KEY_TAG": tag,
        }
        populate = self.child("inductor", mode, env)
        local = Path(tempfile.mkdtemp(prefix="r", dir=self.scratch))
        row = self.child("inductor", mode, env, local)  # another empty local cache: any hit is remote
        self._check_warm("inductor_redis_warm", mode, row)
        # The remote entry holds generated code; shared objects in the empty local cache were built here.
        built = sum(1 for f in local.rglob("*.so") if "triton" not in f.parts)
        if built and row.get("vs_cold", 0) > 0.5:
            self.notes.append(f"inductor_redis_warm/{mode}: hit the remote cache but compiled {built} shared "
                              "objects into its empty local cache (Inductor's remote entry carries C++ source, "
                              "not the built .so), so it saves little over cold")
        return row | {"cache_key_tag": tag, "populate_s": populate["time_to_first_call_s"],
                      "local_so_built": built, "populate_cache_counters": populate.get("cache_counters")}

    def hypatia_cold_daemon(self, mode: str) -> dict:
        home = Path(tempfile.mkdtemp(prefix="h", dir=self.scratch))
        self.homes[mode] = home
        row = self.child("hypatia", mode, {"HYPATIA_HOME": str(home)})
        counters = row.get("hypatia_counters", {})
        from_daemon = counters.get("local_plans", 0) == 0 and counters.get("daemon_hits", 0) + counters.get("daemon_misses", 0) > 0
        if not from_daemon:
            self.notes.append(f"hypatia_cold_daemon/{mode}: plans did not come from the daemon: {counters}")
        return row | {"plans_from_daemon": from_daemon, "daemon_autostarted": daemon_pid(home) is not None}

    def hypatia_warm_daemon(self, mode: str) -> dict:
        home = self.homes.get(mode)
        if home is None or daemon_pid(home) is None:
            raise RuntimeError("the daemon of the hypatia_cold_daemon run is not running")
        row = self.child("hypatia", mode, {"HYPATIA_HOME": str(home)})
        counters = row.get("hypatia_counters", {})
        if counters.get("daemon_hits", 0) == 0:
            self.notes.append(f"hypatia_warm_daemon/{mode}: daemon_hits == 0, the warm process got no plan "
                              f"from the daemon's cache: {counters}")
        return row | {"plans_from_daemon": counters.get("local_plans", 0) == 0 and counters.get("daemon_hits", 0) > 0}

    def _check_warm(self, config: str, mode: str, row: dict) -> None:
        counters = row.get("cache_counters", {})
        if _hits(counters) == 0:
            self.notes.append(f"{config}/{mode}: no FX graph or AOTAutograd cache hit, so it was not warm: {counters}")
        cold = self.cold_time.get(mode)
        if cold:
            row["vs_cold"] = round(row["time_to_first_call_s"] / cold, 3)

    # -- the section ------------------------------------------------------------------------
    def measure(self, config: str, mode: str, started: float, budget_s: float) -> dict:
        row = {"config": config, "mode": mode, "workload": self.workload, "device": self.device,
               "dtype": "float32", "batch": self.batch}
        if self.quick and config not in QUICK_CONFIGS:
            return row | {"skipped": "quick"}
        if config == "inductor_redis_warm":
            if self._redis_problem is False:
                self._redis_problem = redis_problem()
            if self._redis_problem:
                return row | {"skipped": self._redis_problem}
        if time.monotonic() - started > budget_s:
            return row | {"skipped": "time budget"}
        try:
            return row | getattr(self, config)(mode)
        except Exception as exc:  # noqa: BLE001 - one failed measurement must not end the section
            return row | {"error": str(exc) if isinstance(exc, ChildFailed) else f"{type(exc).__name__}: {exc}"}

    def cleanup(self) -> None:
        """Stop the daemons the cold runs started and remove the scratch directory."""
        for mode, home in self.homes.items():
            if daemon_pid(home) is None:
                continue
            env = base_env() | {"HYPATIA_HOME": str(home)}
            proc = subprocess.run([sys.executable, "-m", "hypatia.daemon", "stop"], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                self.notes.append(f"could not stop the hypatiad of {mode} ({home}): {proc.stderr[-300:]}")
        shutil.rmtree(self.scratch, ignore_errors=True)


def _local_cache_env() -> dict:
    # Already the default since torch 2.4; explicit so a changed default cannot make "warm" cold.
    return {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


def daemon_pid(home: Path) -> int | None:
    """The pid of the hypatiad serving ``home``, or None."""
    from hypatia.config import load, read_daemon_pid

    return read_daemon_pid(load({"HYPATIA_HOME": str(home)}))


def run(device: str, quick: bool, budget_s: float) -> dict:
    """Measure time to first call for every configuration and mode; rows past ``budget_s`` are skipped."""
    started = time.monotonic()
    bench = FirstCall(device, quick)
    rows: dict[tuple[str, str], dict] = {}
    try:
        for config in RUN_ORDER:
            for mode in MODES:
                rows[config, mode] = bench.measure(config, mode, started, budget_s)
    finally:
        bench.cleanup()
    notes = bench.notes + [
        f"workload {bench.workload} at batch {bench.batch} on {device}; each time is one fresh process; "
        "time_to_first_call_s runs from torch.compile() through the first call (and backward in training)",
        "inductor_warm reuses the cache directory that the inductor_cold run filled",
    ]
    return {"rows": [rows[c, m] for c in CONFIGS for m in MODES], "notes": notes}
