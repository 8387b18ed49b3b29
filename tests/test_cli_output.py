"""What the installed commands print for a user, run as a user runs them (the console scripts
next to this interpreter) against a real daemon: versions, plans with their graph and model,
short and full stats, a refused tune key, a closed pipe, a refused log level."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from hypatia.daemon import ctl
from hypatia.planner.plan import Plan

BIN = Path(sys.executable).parent

# Two modules of different classes with the same graph: the second gets the first one's plan
# (a hit), so the label stays the first one's. TinyNet also trains, which is a plan of its own.
COMPILE_TWO_MODELS = """
import torch

class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 16)

    def forward(self, x):
        return torch.nn.functional.silu(self.fc(x))

class SameGraphNet(TinyNet):
    pass

torch.manual_seed(0)
x = torch.randn(4, 8)
model = TinyNet()
compiled = torch.compile(model, backend="hypatia")
with torch.no_grad():
    torch.testing.assert_close(compiled(x), model(x))
compiled(x.requires_grad_()).sum().backward()
other = SameGraphNet()
with torch.no_grad():
    torch.testing.assert_close(torch.compile(other, backend="hypatia")(x.detach()), other(x.detach()))
"""


def command(home, name: str, *args: str, extra_env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """The installed console script ``name`` with ``home``'s environment."""
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([str(BIN / name), *args], env=home.env | (extra_env or {}), stderr=subprocess.PIPE, text=True,
                          timeout=60, **kw)


def test_both_commands_print_their_version(home):
    import hypatia
    import torch

    for name in ("hypatiad", "hypatia-ctl"):
        proc = command(home, name, "--version")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"{name} {hypatia.__version__} (torch {torch.__version__}"), proc.stdout


def test_plans_say_which_graph_and_model_and_stats_are_short_unless_all(daemon):
    daemon.python(COMPILE_TWO_MODELS)

    rows = json.loads(command(daemon, "hypatia-ctl", "plans", "--json").stdout)
    assert sorted((r["graph"], r["model"]) for r in rows) == [("inference", "TinyNet"), ("training", "TinyNet")], rows
    text = command(daemon, "hypatia-ctl", "plans").stdout
    assert re.match(r"graph key +graph +model +nodes", text), text
    assert sorted(line.split()[1:3] for line in text.splitlines()[1:]) == [
        ["inference", "TinyNet"], ["training", "TinyNet"]], text
    assert "SameGraphNet" not in text  # the label is the first model's: the second got the plan from the cache
    training = next(r for r in rows if r["graph"] == "training")
    recipe = {"recipe": Plan(graph_key=training["graph_key"]).to_recipe()}
    assert "model       TinyNet, training graph (forward and backward)" in ctl.format_plan(training | recipe)

    short = command(daemon, "hypatia-ctl", "stats")
    assert short.returncode == 0, short.stderr
    labels = [line.split("  ")[0] for line in short.stdout.splitlines()[:-1]]
    assert labels == ["daemon", "store", "plan cache", "plans", "fallbacks", "tuning", "compiled code", "errors"], short.stdout
    assert "--all" in short.stdout.splitlines()[-1]
    stats = daemon.stats()
    assert f"({stats['plan_cache']['hits']} hits, {stats['plan_cache']['misses']} misses)" in short.stdout

    full = command(daemon, "hypatia-ctl", "stats", "--all").stdout
    assert "requests" in full and "coalesced requests" in full
    fired = next(line for line in full.splitlines() if line.startswith("rules fired")).split("  ", 1)[1].strip()
    items = fired.split(", ")
    assert all(re.fullmatch(r"[a-z_0-9]+ [1-9][0-9]*", item) for item in items), fired  # no ".matched", no zeros
    expected = {k.removesuffix(".fired"): v for k, v in stats["rules"].items() if k.endswith(".fired") and v}
    assert dict((k, int(v)) for k, v in (i.rsplit(" ", 1) for i in items)) == expected and "linear_silu" in expected

    # `hypatia-ctl plans | head`: the reader is gone before the command writes; it ends quietly
    read, write = os.pipe()
    os.close(read)
    try:
        piped = command(daemon, "hypatia-ctl", "plans", stdout=write)
    finally:
        os.close(write)
    assert piped.returncode == 141 and piped.stderr == "", piped.stderr


def test_tune_with_a_key_that_matches_no_plan_says_so(home):
    proc = command(home, "hypatia-ctl", "tune", "--key", "g1-nosuchkey")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "no stored plan has a graph key starting with 'g1-nosuchkey'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert home.daemon_pid() is None  # refused before a daemon was started for nothing


def test_an_invalid_log_level_is_refused_like_every_other_variable(home):
    proc = command(home, "hypatiad", "start", extra_env={"HYPATIA_LOG_LEVEL": "LOUD"})
    assert proc.returncode == 2
    assert "HYPATIA_LOG_LEVEL='LOUD' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL" in proc.stderr
    assert "Traceback" not in proc.stderr and home.daemon_pid() is None
    assert command(home, "hypatia-ctl", "status", extra_env={"HYPATIA_LOG_LEVEL": "warn"}).returncode == 3  # not running
