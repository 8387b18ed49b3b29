"""Compiled code shared on the GPU (``pytest -m gpu``): processes on one GPU, each with an empty
local Inductor cache, compile each graph once between them. A hand-written attention block
(Inductor is given its graph with attention rewritten to SDPA) is loaded on the full path; an
MLP (Inductor is given Dynamo's graph) starts warm, without Hypatia's trace. Both run the
executor the first process measured and chose, and match eager."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap

import pytest

from tests.conftest import daemon_stats

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]

SCRIPT = """
import json, os, torch
from tests.test_gpu_executors import Block
torch.manual_seed(0)
block = Block().cuda().to(torch.bfloat16).eval()
mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).cuda().to(torch.bfloat16)
x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
outs = {}
with torch.no_grad():
    for name, m in (("block", block), ("mlp", mlp)):
        c = torch.compile(m, backend="hypatia")
        for _ in range(int(os.environ.get("CALLS", "1"))):  # enough calls to measure every executor
            out = c(x)
        torch.testing.assert_close(out, m(x), rtol=5e-2, atol=5e-2)
from hypatia.client.backend import session
from torch._dynamo.utils import counters
inductor = {k: v for g in ("inductor", "aot_autograd") for k, v in counters[g].items() if "cache" in k}
print(json.dumps({"hypatia": dict(session().counters), "inductor": inductor}))
"""


def _env(home, executor: str) -> dict:
    cache = tempfile.mkdtemp(prefix="ind-", dir=str(home.path))
    return home.env | {"HYPATIA_EXECUTOR": executor, "TORCHINDUCTOR_CACHE_DIR": cache,
                       "TRITON_CACHE_DIR": f"{cache}/triton"}


def _run(home, calls: int, n: int = 1, executor: str = "auto") -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(SCRIPT)], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=_env(home, executor) | {"CALLS": str(calls)})
             for _ in range(n)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_processes_on_one_gpu_compile_each_graph_once_and_later_ones_start_warm(home):
    home.hypatiad("start", extra_env={"HYPATIA_BACKGROUND_TUNING": "0"})  # plans stay as measured
    # two processes at once on a cold daemon, each measuring the executors on its calls: each
    # graph's inductor and inductor+cudagraphs code is compiled by one of them, and whatever the
    # other builds of it (all of it, or only the executor the first one measured and chose, where
    # that choice came first) it loads, and Inductor's caches hit it: candidates built on a later
    # call are compiled under the same key as at Dynamo's compile
    together = _run(home, calls=80, n=2)
    compiled = sum(r["hypatia"].get("artifacts_compiled", 0) for r in together)
    loaded = sum(r["hypatia"].get("artifacts_loaded", 0) for r in together)
    stats = daemon_stats(home.config)["artifacts"]
    assert compiled == 4 and stats["count"] == 4 and stats["compiles_granted"] == 4, (together, stats)
    assert 2 <= loaded <= 4, together
    misses = sum(r["inductor"].get("fxgraph_cache_miss", 0) for r in together)
    hits = sum(r["inductor"].get("fxgraph_cache_hit", 0) for r in together)
    assert misses == compiled and hits >= loaded, together
    # a later process with an empty local cache: no compile at all; the MLP (Inductor was given
    # Dynamo's graph) starts without Hypatia's trace, the block is traced and loads its code
    (later,) = _run(home, calls=3, executor="inductor+cudagraphs")
    h = later["hypatia"]
    assert not h.get("artifacts_compiled") and h["artifacts_loaded"] == 2 and h.get("warm_starts") == 1, later
    assert later["inductor"].get("fxgraph_cache_hit", 0) >= 2 and not later["inductor"].get("fxgraph_cache_miss"), later
