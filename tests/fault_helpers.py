"""Helpers of the fault tests: client programs, daemons the test can SIGKILL and reap, and plan
requests built without torch in the client.

Daemons here run as ``hypatiad start --foreground --detached`` children of the test, so that a
test can SIGKILL one at a moment of its choosing, reap it and read its exit status.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from conftest import wait_until
from hypatia.canonical import RawNode, canonicalize, workload_key
from hypatia.client.rpc import DaemonClient
from hypatia.planner import environment
from hypatia.protocol import PROTOCOL_VERSION

OTHER_PROTOCOL = PROTOCOL_VERSION + 1

# -- programs run as client processes ---------------------------------------------------------

# Compiles one Linear+ReLU model per width given on the command line with backend="hypatia",
# checks each output against eager, and prints its session counters as JSON on the last line.
# PRELUDE (empty, or code that makes this process speak another protocol) runs first.
COMPILE_CLIENT = """
import json, sys, torch
{prelude}
from hypatia.client.backend import session

for width in map(int, sys.argv[1:]):
    torch.manual_seed(width)
    model = torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.ReLU())
    x = torch.randn(4, width)
    with torch.no_grad():
        out = torch.compile(model, backend="hypatia", dynamic=False)(x)
        torch.testing.assert_close(out, model(x))
print(json.dumps(dict(session().counters)))
"""

# A client of the daemon without torch: connects and handshakes, says it is ready, waits for
# the go file, then asks for the plan of one request body as the backend does (get_plan, and
# make_plan on a miss). Prints whether it was a hit and the plan's fused rules.
RAW_CLIENT = """
import json, sys, time
from pathlib import Path
from hypatia.client.rpc import DaemonClient
from hypatia.config import load

bodies, index, ready, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
body = json.loads(bodies.read_text())[index]
client = DaemonClient(load())
client.call("ping")
ready.touch()
while not go.exists():
    time.sleep(0.01)
keys = {k: body[k] for k in ("graph_key", "workload_key", "env_key")}
plan = client.call("get_plan", keys)["plan"]
hit = plan is not None
if not hit:
    plan = client.call("make_plan", body)["plan"]
assert plan["graph_key"] == body["graph_key"], plan
print(json.dumps({"hit": hit, "rules": [r["rule"] for r in plan["regions"]]}))
"""

SKEWED_CLIENT_PRELUDE = f"""
import hypatia.protocol, hypatia.client.rpc
hypatia.protocol.PROTOCOL_VERSION = hypatia.client.rpc.PROTOCOL_VERSION = {OTHER_PROTOCOL}
"""


def compile_client(home, widths: list[int], prelude: str = "", extra_env: dict | None = None) -> tuple[dict, str]:
    """Run COMPILE_CLIENT in a fresh process; its counters and its stderr."""
    proc = home.run("-c", textwrap.dedent(COMPILE_CLIENT.format(prelude=prelude)), *map(str, widths),
                    extra_env=extra_env, timeout=180)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


# -- daemons ----------------------------------------------------------------------------------


class Daemons:
    """Starts hypatiad processes for one home and reaps every one of them at the end."""

    def __init__(self, home):
        self.home = home
        self.procs: list[subprocess.Popen] = []

    def start(self, faults: str = "", extra_env: dict | None = None, wrapper: tuple[str, ...] = ()) -> subprocess.Popen:
        """A daemon serving on the home's socket (it may speak another protocol, so readiness
        is its pid in the lock file and its socket, not an answer). ``wrapper``: a command that
        execs the daemon's command line (its arguments) in the same process."""
        env = self.home.env | {"HYPATIA_FAULTS": faults} | (extra_env or {})
        self.home.config.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.home.config.log_path, "ab") as log:
            proc = subprocess.Popen([*wrapper, sys.executable, "-m", "hypatia.daemon", "start", "--foreground",
                                     "--detached"], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.procs.append(proc)
        ready = wait_until(lambda: proc.poll() is not None or (
            self.home.daemon_pid() == proc.pid and self.home.config.socket_path.exists()), 60)
        assert ready and proc.poll() is None, f"hypatiad exited with {proc.returncode}:\n{self.log()[-3000:]}"
        return proc

    def log(self) -> str:
        return self.home.config.log_path.read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, sig)
            proc.wait(30)


@pytest.fixture
def daemons(home) -> Iterator[Daemons]:
    d = Daemons(home)
    try:
        yield d
    finally:
        d.close()


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


@contextlib.contextmanager
def connection(home, **kw) -> Iterator[DaemonClient]:
    c = DaemonClient(home.config, **kw)
    try:
        yield c
    finally:
        c.close()


# -- plan requests without torch in the client ------------------------------------------------


def linear_relu_request(batch: int, features: int, inputs: int = 8) -> dict:
    """A make_plan body for relu(addmm(b, x, w.t())) with these sizes, keyed for this CPU."""
    def meta(shape: list[int], stride: list[int] | None = None) -> list:
        return ["T", shape, stride or ([shape[1], 1] if len(shape) == 2 else [1]), "float32", "cpu"]

    x, w, b = meta([batch, inputs]), meta([features, inputs]), meta([features])
    y = meta([batch, features])
    graph, _ = canonicalize(
        [
            RawNode("placeholder", [0], {}, x),
            RawNode("placeholder", [1], {}, w),
            RawNode("placeholder", [2], {}, b),
            RawNode("aten.t.default", [["n", 1]], {}, meta([inputs, features], [1, inputs])),
            RawNode("aten.addmm.default", [["n", 2], ["n", 0], ["n", 3]], {}, y),
            RawNode("aten.relu.default", [["n", 4]], {}, y),
        ],
        ["n", 5],
    )
    env_key, env = environment.describe("cpu")
    return {
        "graph_key": graph.key,
        "workload_key": workload_key([x, w, b])[0],
        "env_key": env_key,
        "graph": graph.to_wire(),
        "workload": [x, w, b],
        "environment": env,
    }


def keys_of(body: dict) -> tuple[str, str, str]:
    return body["graph_key"], body["workload_key"], body["env_key"]


def key_body(body: dict) -> dict:
    return dict(zip(("graph_key", "workload_key", "env_key"), keys_of(body)))


def stored_plan_keys(path: Path) -> set[tuple[str, str, str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return set(conn.execute("SELECT graph_key, workload_key, env_key FROM plans").fetchall())
