"""HYPATIA_ARTIFACTS: one folder per process and per compiled graph, holding what each compile
saw and decided; the model's results are those of eager PyTorch; nothing is written without it;
``hypatia-ctl debug run`` runs a script with it set."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch

from hypatia.client.capture import capture
from hypatia.client.torch_internals import structured_trace_logger
from hypatia.debug.artifacts import GraphArtifacts, write_kernels
from hypatia.debug.folder import process_folder
from hypatia.debug.trace import TraceCollector
from hypatia.debug.trail import Trail
from hypatia.planner import Plan, plan_graph
from graphs import aten_graph

PROCESS_KEYS = {"pid", "host", "argv", "started", "torch", "hypatia", "config"}
SUMMARY_KEYS = {"index", "phase", "graph_key", "workload_key", "env_key", "model", "from_daemon", "executor", "regions",
                "fallbacks", "verdicts"}


class MLP(torch.nn.Module):
    def __init__(self, branch: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.branch = torch.nn.Linear(32, 64), torch.nn.Linear(64, 16), branch

    def forward(self, x):
        y = torch.relu(self.fc2(torch.nn.functional.gelu(self.fc1(x))))
        if self.branch and y.sum() > 0:  # a graph break: data-dependent control flow
            y = y * 2
        return y.tanh()


def the_folder(root: Path) -> Path:
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder


def graph_folders(folder: Path) -> list[Path]:
    return sorted(folder.glob("graph-*"))


def check_graph_folder(g: Path, plan: Plan, phase: str, activation_bytes: int) -> dict:
    """The files every planned graph has on the CPU, and what they must say."""
    summary = json.loads((g / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["phase"] == phase and summary["graph_key"] == plan.graph_key
    assert g.name == f"graph-{summary['index']:03d}-{plan.graph_key[:12]}"
    assert [(r["rule"], r["kernel"], r["output"], r["nodes"]) for r in summary["regions"]] == \
        [(r.rule, r.kernel, r.output, list(r.nodes)) for r in plan.regions]
    assert Plan.from_recipe(json.loads((g / "plan.json").read_text())).to_recipe() == plan.to_recipe()
    for name in ("dynamo.py", "executed.py", *(["aot_forward.py", "aot_backward.py"] if phase == "training"
                                               else ["aot_inference.py"])):
        compile((g / name).read_text(), str(g / name), "exec")  # readable and valid Python
    assert "def forward" in (g / "dynamo.py").read_text()
    rewrites = json.loads((g / "rewrites.json").read_text())
    assert [f["rule"] for f in rewrites["fired"]] == [r.rule for r in plan.regions]
    matched = {(m["rule"], m["output"]) for m in rewrites["matched"]}
    assert {(r.rule, r.output) for r in plan.regions} <= matched and rewrites["source"]
    for rejected in rewrites["rejected"]:
        assert rejected["rule"] and rejected["reason"] and rejected["stage"]
    # fc1 + GELU and fc2 + ReLU, or the MLP region over fc1, GELU and fc2: what is not chosen of
    # these overlapping candidates is rejected, saying which region it overlaps
    fired = {r.rule for r in plan.regions}
    assert any(r["stage"] == "path" and "overlaps the chosen region" in r["reason"] and r["reason"].split()[-4] in fired
               for r in rewrites["rejected"]), rewrites
    stats = json.loads((g / "stats.json").read_text())
    assert stats["ops"]["torch._C._nn.linear"] == 2 and stats["ops"]["torch._C._nn.gelu"] == 1
    assert stats["inputs"] == 5 and stats["nodes"] == stats["inputs"] + sum(stats["ops"].values()) + 1
    assert stats["aten"]["ops"]["aten.addmm.default"] == 2
    assert stats["parameter_bytes"] == 4 * (64 * 32 + 64 + 16 * 64 + 16)
    assert stats["activation_bytes"] == activation_bytes and stats["dtypes"]["float32"] >= 5
    assert "TENSOR_MATCH" in (g / "guards.txt").read_text()
    assert not (g / "kernels").exists()  # the CPU runs no generated kernel sources
    return summary


def test_inference_under_inductor_writes_every_file(daemon, dynamo_reset, monkeypatch, tmp_path):
    monkeypatch.setenv("HYPATIA_ARTIFACTS", str(tmp_path))
    monkeypatch.setenv("HYPATIA_EXECUTOR", "inductor")
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        out = torch.compile(model, backend="hypatia")(x)
        torch.testing.assert_close(out, model(x))
    from hypatia.client.backend import session

    s = session()
    assert s.counters["artifacts_write_errors"] == 0 and s.counters["fallbacks"] == 0
    folder = the_folder(tmp_path)
    info = json.loads((folder / "process.json").read_text())
    assert PROCESS_KEYS <= set(info) and info["pid"] == os.getpid() and info["torch"] == torch.__version__
    assert info["config"]["HYPATIA_ARTIFACTS"] == str(tmp_path)
    assert folder.name.startswith(f"{info['host'].split('.')[0]}-{os.getpid()}-")
    (g,) = graph_folders(folder)
    ((phase, plan),) = list(s.plans)
    # linear, gelu (4x64), linear, relu, tanh (4x16), float32
    summary = check_graph_folder(g, plan, "inference", 4 * (2 * 4 * 64 + 3 * 4 * 16))
    assert summary["executor"] == "inductor" and summary["from_daemon"] is True
    code = sorted((g / "inductor").glob("*.py"))
    assert code and any("def call(" in p.read_text() for p in code)
    for p in code:
        compile(p.read_text(), str(p), "exec")
    executed = (g / "executed.py").read_text()
    assert executed.startswith("# executor inductor")
    assert json.loads((g / "graph_breaks.json").read_text()) == []


def test_training_with_a_graph_break(home, dynamo_reset, monkeypatch, tmp_path):
    monkeypatch.setenv("HYPATIA_ARTIFACTS", str(tmp_path))
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    from hypatia.client.backend import session

    # as in a process started with the variable set (the backend listens from its import): the
    # first graph break comes before the first graph reaches the backend
    assert session().artifacts is not None
    torch.manual_seed(0)
    model, reference = MLP(branch=True), MLP(branch=True)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 32)
    out, expected = torch.compile(model, backend="hypatia")(x), reference(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    s = session()
    assert s.counters["artifacts_write_errors"] == 0
    folder = the_folder(tmp_path)
    folders = graph_folders(folder)
    plans = [plan for _, plan in s.plans]
    assert len(folders) == len(plans) == 2  # before and after the break
    # up to the break: linear, gelu (4x64), linear, relu (4x16), the sum (float32) and its test (bool)
    summary = check_graph_folder(folders[0], plans[0], "training", 4 * (2 * 4 * 64 + 2 * 4 * 16) + 4 + 1)
    assert summary["executor"] == "aten" and summary["from_daemon"] is False
    # planned in this process, so checked in it: one passing verdict per region
    assert sorted((v["rule"], v["passed"]) for v in summary["verdicts"]) == sorted((r.rule, True) for r in plans[0].regions)
    assert "hypatia." in (folders[0] / "executed.py").read_text()  # the rewritten graph calls the fused ops
    drawing = ElementTree.parse(folders[0] / "regions.svg").getroot()
    groups = drawing.findall("{http://www.w3.org/2000/svg}g")
    fused = [g for g in groups if g.get("class") == "node fused"]
    assert len(fused) == sum(len(r.nodes) for r in plans[0].regions) and len(groups) > len(fused)
    legend = " ".join(t.text for t in drawing.findall("{http://www.w3.org/2000/svg}text"))
    assert all(r.rule in legend for r in plans[0].regions)
    breaks = json.loads((folder / "graph_breaks.json").read_text())
    assert any("Data-dependent branching" in b["reason"] and "test_debug_artifacts.py" in b["where"] for b in breaks)
    assert json.loads((folders[0] / "graph_breaks.json").read_text())[0]["reason"] == breaks[0]["reason"]
    assert len(list(folder.glob("guards-*.txt"))) >= 2
    second = json.loads((folders[1] / "summary.json").read_text())
    assert second["index"] == 2 and second["phase"] == "training"


def test_nothing_is_written_or_listened_to_without_it(home, dynamo_reset, monkeypatch, tmp_path):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    monkeypatch.chdir(tmp_path)
    model = MLP().eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="hypatia")(x), model(x))
    from hypatia.client.backend import session

    assert session().artifacts is None and session().counters["regions_fused"] == 2
    assert list(tmp_path.iterdir()) == []
    assert not any(isinstance(h, TraceCollector) for h in structured_trace_logger().handlers)


def test_a_folder_that_cannot_be_written_is_counted_and_the_model_runs(home, dynamo_reset, monkeypatch, tmp_path,
                                                                        caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("HYPATIA_ARTIFACTS", str(blocked))
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    model = MLP().eval()
    x = torch.randn(4, 32)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="hypatia.client"):
        torch.testing.assert_close(torch.compile(model, backend="hypatia")(x), model(x))
    from hypatia.client.backend import session

    assert session().counters["artifacts_write_errors"] >= 1 and session().counters["fallbacks"] == 0
    assert session().counters["regions_fused"] == 2
    assert sum("artifacts_write_errors" in r.message for r in caplog.records) == 1  # said once


def test_the_process_folder_is_made_once_per_process(tmp_path):
    first = process_folder(tmp_path)
    assert process_folder(str(tmp_path)) == first and (first / "process.json").exists()
    assert len(list(tmp_path.iterdir())) == 1


def test_generated_kernel_sources_are_written(tmp_path):
    """A pointwise chain planned on the CPU, as the NVRTC kernel would run it on a GPU."""
    gm = aten_graph(lambda a, b: (a * b + 1.0).sigmoid() * 2.0, torch.randn(8, 16), torch.randn(8, 16))
    graph, fx_nodes = capture(gm)
    plan = plan_graph(graph)
    (region,) = plan.regions
    assert region.rule == "pointwise_chain"
    nvrtc = Plan(plan.graph_key, regions=(region.__class__(**{**region.__dict__, "kernel": "pointwise/gpu_cupy/generated"}),))
    trail = Trail(gm, [], "inference", fx_nodes=fx_nodes, plan=nvrtc)
    g = GraphArtifacts.create(tmp_path, 1, plan.graph_key)
    (path,) = write_kernels(g, trail)
    assert path.parent.name == "kernels" and path.suffix == ".cu"
    assert "hy_pointwise" in path.read_text() and "float" in path.read_text()
    assert write_kernels(g, Trail(gm, [], "inference", fx_nodes=fx_nodes, plan=plan)) == []  # the CPU's: none


def test_debug_run_writes_the_folder_and_returns_the_scripts_status(home, tmp_path):
    script = tmp_path / "tiny.py"
    script.write_text(
        "import sys, torch\n"
        "f = torch.compile(lambda x, w, b: torch.nn.functional.linear(x, w, b).relu(), backend='hypatia')\n"
        "with torch.no_grad():\n"
        "    f(torch.randn(4, 8), torch.randn(6, 8), torch.randn(6))\n"
        "sys.exit(int(sys.argv[1]))\n")
    out = tmp_path / "arts"
    proc = home.ctl("debug", "run", "--out", str(out), str(script), "3", check=False, timeout=120,
                    extra_env={"HYPATIA_AUTOSTART": "0"})
    assert proc.returncode == 3, proc.stderr
    folder = the_folder(out)
    assert str(folder) in proc.stderr and "1 compiled graph" in proc.stderr
    info = json.loads((folder / "process.json").read_text())
    assert info["argv"][-1] == "3" and info["config"]["HYPATIA_ARTIFACTS"] == str(out)
    (g,) = graph_folders(folder)
    summary = json.loads((g / "summary.json").read_text())
    assert [r["rule"] for r in summary["regions"]] == ["linear_relu"]


def test_a_graph_hypatia_does_not_plan_gets_a_folder_saying_why(home, dynamo_reset, monkeypatch, tmp_path):
    monkeypatch.setenv("HYPATIA_ARTIFACTS", str(tmp_path))
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")

    def f(x):
        return (x * 2).relu()

    x = torch.randn(6, 3)
    torch.testing.assert_close(torch.compile(f, backend="hypatia", dynamic=True)(x), f(x))
    from hypatia.client.backend import session

    assert session().counters["artifacts_write_errors"] == 0 and session().counters["graphs_not_rewritten"] == 1
    (g,) = graph_folders(the_folder(tmp_path))
    assert g.name == "graph-001-unplanned"
    summary = json.loads((g / "summary.json").read_text())
    assert summary["regions"] == [] and "dynamic shapes" in summary["fallbacks"][0]["reason"]
    assert not (g / "plan.json").exists() and not (g / "rewrites.json").exists()
    assert "nothing was rewritten" in (g / "executed.py").read_text().splitlines()[0]
    assert json.loads((g / "stats.json").read_text())["ops"]


def test_a_graph_that_fails_at_run_time_says_so_in_its_summary(home, dynamo_reset, monkeypatch, tmp_path):
    from hypatia.client import executors
    from hypatia.client.backend import HypatiaFallbackWarning, session

    monkeypatch.setenv("HYPATIA_ARTIFACTS", str(tmp_path))
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")

    def planted(*args):
        raise RuntimeError("a planted executor failure")

    monkeypatch.setattr(executors, "build", lambda name, graphs, args=None: planted)
    model = MLP().eval()
    x = torch.randn(4, 32)
    with torch.no_grad(), pytest.warns(HypatiaFallbackWarning, match="planted"):
        torch.testing.assert_close(torch.compile(model, backend="hypatia")(x), model(x))
    assert session().counters["fallbacks"] == 1 and session().counters["artifacts_write_errors"] == 0
    (g,) = graph_folders(the_folder(tmp_path))
    summary = json.loads((g / "summary.json").read_text())
    assert summary["executor"] == "eager" and len(summary["regions"]) == 2
    assert [f["reason"] for f in summary["fallbacks"]] == \
        ["the graph failed at run time: RuntimeError: a planted executor failure"]
