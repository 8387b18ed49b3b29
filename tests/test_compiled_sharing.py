"""Compiled code shared through a real hypatiad by real processes: compiled once, loaded by the
rest (even with an empty local Inductor cache), one compile for processes that miss at once, a
dead or silent compiler taken over, and settings that change the code kept apart.

Every process here has its own empty TORCHINDUCTOR_CACHE_DIR, so only the daemon can make one
warm, and Inductor's own counters say whether it found its caches warm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from tests.conftest import daemon_stats, wait_until

pytestmark = pytest.mark.timeout(600)

# One model, compiled for inference and for a training step (two graphs), checked against
# eager; the process prints its counters. WIDTH picks the graph (its shapes), so tests that must
# not share a compile use different widths.
MODEL = """
import json, os, sys, torch
WIDTH = int(os.environ.get("WIDTH", "24"))
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, 4))
x = torch.randn(3, WIDTH)
{before}
compiled = torch.compile(m, backend="hypatia")
with torch.no_grad():
    torch.testing.assert_close(compiled(x), m(x))
if os.environ.get("TRAIN") == "1":
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m(x).square().sum().backward()
    for got, want in zip(grads, [p.grad for p in m.parameters()]):
        torch.testing.assert_close(got, want)
from hypatia.client.backend import session
from torch._dynamo.utils import counters
inductor = {{k: v for g in ("inductor", "aot_autograd") for k, v in counters[g].items() if "cache" in k}}
print(json.dumps({{"hypatia": dict(session().counters), "inductor": inductor{after}}}))
"""


def model(before: str = "", after: str = "") -> str:
    return MODEL.format(before=before, after=after)


def env_for(home, width: int = 24, train: bool = False, **extra: str) -> dict:
    cache = tempfile.mkdtemp(prefix="ind-", dir=str(home.path))
    return {"HYPATIA_EXECUTOR": "inductor", "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_COMPILE_THREADS": "1",
            "WIDTH": str(width), "TRAIN": "1" if train else "0"} | extra


def run(home, code: str, env: dict) -> dict:
    proc = home.python(code, timeout=300, extra_env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spawn(home, code: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=home.env | env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def artifact_rows(home) -> list[tuple]:
    from hypatia.planner.store import Store

    store = Store(home.config.store_path, readonly=True)
    try:
        return store.query("SELECT candidate, device_index, direct, size FROM artifacts ORDER BY created_at")
    finally:
        store.close()


def test_a_later_process_loads_the_compiled_code_and_starts_without_tracing(daemon):
    """The first process compiles both graphs and sends them; a second process with an empty local
    cache loads them (Inductor hits its FX graph and AOTAutograd caches) and, since Inductor was
    given Dynamo's graphs unchanged, skips Hypatia's trace entirely."""
    first = run(daemon, model(after=', "user": 0 if (b := torch.compiler.save_cache_artifacts()) is None else len(b[0])'),
                env_for(daemon, train=True))
    assert first["hypatia"]["artifacts_compiled"] == 2, first
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 2 and not first["inductor"].get("fxgraph_cache_hit")
    assert first["user"] > 0  # the user's own save_cache_artifacts still sees what Hypatia compiled
    rows = artifact_rows(daemon)
    assert [(c, i, d) for c, i, d, _ in rows] == [("inductor", 0, 1), ("inductor", 0, 1)], rows

    second = run(daemon, model(), env_for(daemon, train=True))
    assert second["hypatia"].get("warm_starts") == 2, second
    assert second["hypatia"]["artifacts_loaded"] == 2 and not second["hypatia"].get("artifacts_compiled")
    assert "daemon_hits" not in second["hypatia"] and "daemon_misses" not in second["hypatia"]  # no trace, no keys
    assert second["inductor"]["fxgraph_cache_hit"] >= 2 and not second["inductor"].get("fxgraph_cache_miss")
    assert second["inductor"]["autograd_cache_hit"] == 2  # AOTAutograd did not trace again either

    stats = daemon.stats()["artifacts"]
    assert stats["count"] == 2 and stats["stored"] == 2 and stats["warm_hits"] == 2 and stats["compiles_granted"] == 2
    assert stats["bytes"] == sum(size for *_, size in artifact_rows(daemon))


def test_processes_missing_at_once_compile_once(daemon):
    """Three processes start together on a cold daemon: one compiles, the others wait for its
    artifacts and load them."""
    procs = [spawn(daemon, model(), env_for(daemon, width=20)) for _ in range(3)]
    results = [finish(p) for p in procs]
    counters = [r["hypatia"] for r in results]
    assert sum(c.get("artifacts_compiled", 0) for c in counters) == 1, counters
    assert sum(c.get("artifacts_loaded", 0) for c in counters) == 2, counters
    assert sum(r["inductor"].get("fxgraph_cache_miss", 0) for r in results) == 1
    stats = daemon_stats(daemon.config)["artifacts"]
    assert stats["compiles_granted"] == 1 and stats["count"] == 1 and stats["takeovers"] == 0, stats


# A process whose Inductor compile hangs after it claimed the graph (its heartbeat thread goes on).
HANGS = model(before="""
import time, hypatia.client.executors.inductor as inductor
inductor.inductor_compile = lambda *a, **k: time.sleep(3600)
""")


@pytest.fixture
def quick_heartbeat(home):
    home.hypatiad("start", extra_env={"HYPATIA_COMPILE_HEARTBEAT_S": "1"})
    return home


def test_a_compiler_that_dies_holding_the_claim_is_taken_over(quick_heartbeat):
    """A process claims a graph and hangs in its compile (its heartbeat goes on, so a second process
    waits for it); then it dies: its heartbeat stops and the waiter compiles the graph itself."""
    home = quick_heartbeat
    dead = spawn(home, HANGS, env_for(home, width=28))
    assert wait_until(lambda: daemon_stats(home.config)["artifacts"]["compiling"] == 1, timeout=120)
    waiter = spawn(home, model(), env_for(home, width=28))
    assert wait_until(lambda: daemon_stats(home.config)["artifacts"]["waits"] >= 3, timeout=120)  # it asks, and waits
    os.killpg(dead.pid, signal.SIGKILL)  # dies holding the claim: its heartbeat stops
    dead.communicate()
    result = finish(waiter)
    assert result["hypatia"]["artifacts_waited"] == 1 and result["hypatia"]["artifacts_took_over"] == 1
    assert result["hypatia"]["artifacts_compiled"] == 1, result
    stats = daemon_stats(home.config)["artifacts"]
    assert stats["takeovers"] == 1 and stats["compiling"] == 0 and stats["count"] == 1, stats


class Waiting:
    """A daemon connection on which another process is always compiling the graph."""

    def __init__(self):
        self.calls: list[str] = []

    def call(self, method, body=None, **kw):
        self.calls.append(method)
        if method == "get_compiled":
            return {"wait": True, "holder": "elsewhere:1", "retry_ms": 50}
        return {"stored": True}


def test_a_process_waits_for_a_compile_that_never_ends_no_longer_than_its_limit(monkeypatch):
    """A compiler whose heartbeat goes on but whose compile never ends is waited for up to
    HYPATIA_COMPILE_WAIT_S; then the process compiles by itself and sends its code."""
    from collections import Counter

    from hypatia.client import compiled
    from hypatia.config import load

    monkeypatch.setattr(compiled, "recording_artifacts", _recording(b"code"))
    config = load({"HYPATIA_HOME": "/tmp/hy-none", "HYPATIA_COMPILE_WAIT_S": "1"})
    counters, daemon = Counter(), Waiting()
    sharing = compiled.CodeSharing(config, daemon, counters, lambda kind, message: None)
    key = compiled.CompileKey("g1-a", "w1-b", "e1-c", "inductor", 0, "0" * 64, compiled.DYNAMO, "s1-d")
    started = time.monotonic()
    assert sharing.compile(key, lambda: "compiled here") == "compiled here"
    assert time.monotonic() - started >= 1.0  # it did wait, then gave up waiting
    assert counters == Counter(artifacts_waited=1, artifacts_took_over=1, artifacts_compiled=1), counters
    assert daemon.calls.count("get_compiled") >= 2 and daemon.calls[-1] == "put_compiled"


def _recording(content: bytes):
    import contextlib

    from hypatia.client.torch_internals import Recorded

    @contextlib.contextmanager
    def recording():
        recorded = Recorded()
        yield recorded
        recorded.content = content

    return recording


def test_the_key_changes_with_every_code_changing_setting_and_version(monkeypatch):
    """A process whose Inductor or AOTAutograd settings, torch, Triton or Hypatia differ asks for
    another artifact: its key (and its warm-start key) differ."""
    import torch
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from hypatia.client import compiled

    base = compiled.config_digest()
    assert compiled.config_digest() == base
    # the config modules' own patch (monkeypatch's undo would delete a config entry)
    for config, name, value in ((inductor_config, "cpp.simdlen", 0), (inductor_config, "max_autotune", True),
                                (functorch_config, "activation_memory_budget", 0.5)):
        with config.patch({name: value}):
            assert compiled.config_digest() != base, name
        assert compiled.config_digest() == base
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert compiled.config_digest() != base
    monkeypatch.undo()
    key = dict(graph_key="g1-a", workload_key="w1-b", env_key="e1-c", candidate="inductor", device_index=0,
               config=base, given=compiled.DYNAMO, source_key="s1-d")
    k = compiled.CompileKey(**key).key
    for field, other in (("env_key", "e1-other"), ("candidate", "inductor+cudagraphs"), ("device_index", 1),
                         ("config", "0" * 64), ("given", "regions")):
        assert compiled.CompileKey(**(key | {field: other})).key != k, field
    assert compiled.CompileKey(**(key | {"source_key": "s1-e"})).key == k  # a name for lookups, not part of the key


def test_sharing_off_leaves_every_compile_to_its_process(monkeypatch):
    from hypatia.client.backend import Session
    from hypatia.config import load

    assert Session(load({"HYPATIA_SHARE_COMPILED": "0", "HYPATIA_HOME": "/tmp/hy-none"})).sharing is None
    assert Session(load({"HYPATIA_HOME": "/tmp/hy-none"})).sharing is not None
