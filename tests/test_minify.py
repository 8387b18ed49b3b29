"""The minifier: ddmin keeps dependencies valid and reaches a 1-minimal graph; the repro script it
writes reproduces a planted wrong kernel in a fresh process (exit 1) and passes once the kernel is
right (exit 0); the automatic triggers write repros under the artifacts folder."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import hypatia.kernels.linear_activation as la
from hypatia.debug import DoesNotFail, minify, minify_model, process_folder, write_repro
from hypatia.debug.delta import accuracy_check, ddmin

aten = torch.ops.aten

# The planted fault in a fresh process, switched on by PLANT=wrong (the script is unchanged):
# linear + ReLU's kernel is off by 0.01.
SITECUSTOMIZE = """
import os
if os.environ.get("PLANT") == "wrong":
    import hypatia.kernels.linear_activation as la
    _right = la.addmm_relu
    la.addmm_relu = lambda b, x, w, shape=None: _right(b, x, w, shape) + 1e-2
"""


def plant_wrong(monkeypatch) -> None:
    right = la.addmm_relu
    monkeypatch.setattr(la, "addmm_relu", lambda b, x, w, shape=None: right(b, x, w, shape) + 1e-2)


@pytest.fixture
def run_script(tmp_path):
    """Run a script in a fresh interpreter, with or without a planted fault; (exit code, output)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)

    def run(path: Path, plant: str = "") -> tuple[int, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HYPATIA_") and k != "PLANT"}
        env |= {"PYTHONPATH": str(site), "HYPATIA_AUTOSTART": "0"} | ({"PLANT": plant} if plant else {})
        proc = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout + proc.stderr
    return run


def run_here(path: Path) -> tuple[int, str]:
    """Run a script in this process as ``__main__`` (with this process's planted faults): (exit
    code, what it printed). The fresh-process runs are the slow part; one test makes them."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(str(path), run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue()


def deep(x, w1, b1, w2, b2, w3):
    """More than 20 operators, one linear + ReLU among them."""
    h = torch.nn.functional.linear(x, w1, b1).relu()
    h = h * 2 + 1
    h = torch.tanh(h) - h.sigmoid()
    h = torch.nn.functional.linear(h, w2, b2)
    h = h.exp().clamp(max=3.0) + h.abs()
    h = h @ w3
    h = h.softmax(-1) * 3 - h.mean()
    return h.sum(0) + h.max()


def deep_inputs():
    torch.manual_seed(0)
    return [torch.randn(4, 8), torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8), torch.randn(8, 8)]


def targets(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


# -- ddmin ----------------------------------------------------------------------------------
def test_ddmin_finds_the_two_items_that_fail_together():
    items = list(range(40))
    seen = []

    def fails(subset):
        seen.append(len(subset))
        return "both" if 7 in subset and 31 in subset else None

    kept, failure, tests, minimal = ddmin(items, fails)
    assert kept == [7, 31] and failure == "both" and minimal
    assert len(seen) <= tests < 80  # a subset asked twice is answered from the cache
    # out of tests: a failing subset, said not to be minimal
    kept, failure, tests, minimal = ddmin(items, fails, max_tests=3)
    assert {7, 31} <= set(kept) and len(kept) > 2 and tests == 3 and not minimal


def test_minify_keeps_two_nodes_that_fail_together_and_feeds_their_inputs():
    def chain(x, y):
        a = torch.sin(x) + y
        b = (a * 3).exp()
        c = torch.cos(b) - a
        return (c.relu() + b).sum()

    x, y = torch.randn(5, 3), torch.randn(5, 3)
    gm = make_fx(chain)(x, y)
    assert len([n for n in gm.graph.nodes if n.op == "call_function"]) >= 8

    def fails(candidate, inputs):
        kept = set(targets(candidate))
        return "sin and cos" if {aten.sin.default, aten.cos.default} <= kept else None

    small = minify(gm, [x, y], fails)
    assert sorted(map(str, targets(small.gm))) == ["aten.cos.default", "aten.sin.default"]
    assert small.failure == "sin and cos" and small.original_nodes >= 8
    # cos reads b, which was not kept: b's value on the original inputs is a new input
    values = small.gm(*small.inputs)
    b = (torch.sin(x) + y).mul(3).exp()
    torch.testing.assert_close(values[-1], torch.cos(b))
    torch.testing.assert_close(values[0], torch.sin(x))


def test_a_tuple_result_is_kept_or_dropped_with_its_parts(tmp_path):
    def two_results(x):
        values, indices = x.exp().max(dim=1)
        return values.sin() + indices.float()

    x = torch.randn(4, 5)
    gm = make_fx(two_results)(x)
    small = minify(gm, [x], lambda g, i: "sin" if aten.sin.default in targets(g) else None)
    assert targets(small.gm) == [aten.sin.default]
    assert [tuple(t.shape) for t in small.inputs] == [(4,)]  # the max's values, not the tuple
    small = minify(gm, [x], lambda g, i: "max" if aten.max.dim in targets(g) else None)
    assert aten.max.dim in targets(small.gm) and aten.exp.default not in targets(small.gm)
    path = write_repro(small, tmp_path / "repro.py", what="a tuple result", check="runs")
    assert run_here(path) == (0, "NOT REPRODUCED: the check passes\n")  # the script runs as written


def test_a_graph_that_passes_has_nothing_to_minify():
    gm = make_fx(lambda x: x.sin().cos())(torch.randn(3))
    with pytest.raises(DoesNotFail):
        minify(gm, [torch.randn(3)], lambda g, i: None)


class Net(torch.nn.Module):
    """Linear + ReLU (fused as linear_relu) among operators nothing fuses."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 16)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return torch.tanh(h) * h.sigmoid() - h.mean()


# -- a planted wrong kernel, end to end ------------------------------------------------------
def test_planted_wrong_kernel_minifies_to_a_few_nodes_and_the_repro_reproduces(monkeypatch, tmp_path, run_script):
    inputs = deep_inputs()
    gm = make_fx(deep)(*inputs)
    assert len([n for n in gm.graph.nodes if n.op == "call_function"]) >= 20
    check = accuracy_check()
    assert check(gm, inputs) is None  # the right kernel: nothing fails
    plant_wrong(monkeypatch)
    small = minify(gm, inputs, check)
    assert len(small.nodes) <= 3, small.gm.code
    assert aten.addmm.default in targets(small.gm) and aten.relu.default in targets(small.gm)
    assert "linear_relu" in small.failure and "0.01" in small.failure
    path = write_repro(small, tmp_path / "repro.py", what="linear + ReLU computes the wrong value", check="accuracy",
                       source="tests/test_minify.py")
    text = path.read_text()
    assert "torch.manual_seed(0)" in text and "torch.ops.aten.addmm.default(" in text
    assert "# Hypatia repro: linear + ReLU computes the wrong value" in text
    code, out = run_script(path, plant="wrong")
    assert code == 1 and "REPRODUCED: fused (linear_relu)" in out, out
    code, out = run_script(path)
    assert code == 0 and "NOT REPRODUCED" in out, out


def test_a_compile_error_minifies_to_the_region_that_cannot_be_built(monkeypatch, tmp_path):
    import hypatia.planner.executable as executable

    class KernelMissing(Exception):
        pass

    real = executable.load_kernel

    def load_kernel(kernel_id, placement="device"):
        if kernel_id.startswith("linear_activation/"):
            raise KernelMissing(f"{kernel_id} cannot be compiled here")
        return real(kernel_id, placement)

    monkeypatch.setattr(executable, "load_kernel", load_kernel)
    inputs = deep_inputs()
    small = minify(make_fx(deep)(*inputs), inputs, accuracy_check())
    assert small.failure.startswith("compile error: KernelMissing: linear_activation/")
    assert aten.addmm.default in targets(small.gm) and aten.relu.default in targets(small.gm)
    assert len(small.nodes) <= 3 and small.minimal
    path = write_repro(small, tmp_path / "repro.py", what="a kernel cannot be compiled", check="accuracy")
    code, out = run_here(path)
    assert code == 1 and "REPRODUCED: compile error: KernelMissing" in out, out


def test_a_runtime_exception_minifies_to_the_raising_node_with_its_index_kept(tmp_path):
    def gather(x, idx, w):
        h = (x @ w).relu() + 1
        g = h[idx]  # idx holds an index past the end
        return (g * 2).sum() + h.mean()

    x, w = torch.randn(6, 4), torch.randn(4, 4)
    idx = torch.tensor([0, 2, 9])
    gm = make_fx(gather)(x, torch.tensor([0, 2, 5]), w)

    def fails(candidate, inputs):
        try:
            candidate(*inputs)
        except Exception as exc:  # noqa: BLE001 - the failure looked for
            return f"{type(exc).__name__}: {exc}"
        return None

    small = minify(gm, [x, idx, w], fails)
    assert targets(small.gm) == [aten.index.Tensor], small.gm.code
    path = write_repro(small, tmp_path / "repro.py", what="index out of range", check="runs")
    assert "literal([0, 2, 9]" in path.read_text()  # exact index values kept
    code, out = run_here(path)
    assert code == 1 and "REPRODUCED: IndexError" in out, out


def test_minify_model_writes_a_repro_of_the_failing_graph(monkeypatch, tmp_path, dynamo_reset):
    model = Net().eval()
    plant_wrong(monkeypatch)
    x = torch.randn(3, 8)
    with pytest.raises(DoesNotFail):  # 0.01 off is within this tolerance
        minify_model(model, [x], check="accuracy", out=tmp_path / "loose.py", atol=0.05, rtol=0.0)
    path = minify_model(model, [x], check="accuracy", out=tmp_path / "model_repro.py")
    text = path.read_text()
    assert "minify_model(Net)" in text and "ATOL = None" in text
    code, out = run_here(path)
    assert code == 1 and "REPRODUCED" in out, out
    monkeypatch.undo()
    assert run_here(path)[0] == 0


# -- automatic triggers ---------------------------------------------------------------------


def test_process_folder_is_made_once_per_process(tmp_path):
    first = process_folder(tmp_path)
    assert process_folder(str(tmp_path)) == first
    record = json.loads((first / "process.json").read_text())
    assert record["pid"] == os.getpid() and first.name.startswith(f"{record['host']}-{os.getpid()}-")
    assert set(record) >= {"pid", "host", "argv", "started", "torch", "hypatia", "config"}


def test_a_region_failing_strict_validation_writes_a_repro(home, dynamo_reset, monkeypatch, tmp_path):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    monkeypatch.setenv("HYPATIA_CHECKSUM_MODE", "strict")
    monkeypatch.setenv("HYPATIA_ARTIFACTS", str(tmp_path / "artifacts"))
    plant_wrong(monkeypatch)
    from hypatia.client import backend

    model, x = Net().eval(), torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="hypatia")(x), model(x))
    assert backend.session().counters["regions_failed_validation"] == 1
    (repro,) = (tmp_path / "artifacts").glob("*/repros/*.py")
    assert repro.name == "repro-001-linear_relu.py"
    assert (repro.parent.parent / "process.json").exists()
    code, out = run_here(repro)
    assert code == 1 and "REPRODUCED" in out, out
    monkeypatch.undo()
    code, out = run_here(repro)
    assert code == 0 and "NOT REPRODUCED" in out, out


def test_an_executor_raising_at_run_time_writes_a_repro(home, dynamo_reset, monkeypatch, tmp_path):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    monkeypatch.setenv("HYPATIA_CHECKSUM_MODE", "off")  # a check would catch it before it runs
    monkeypatch.setenv("HYPATIA_ARTIFACTS", str(tmp_path / "artifacts"))
    from hypatia.client import backend

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(torch, "_addmm_activation", broken)
    model, x = Net().eval(), torch.randn(3, 8)
    with torch.no_grad(), pytest.warns(backend.HypatiaFallbackWarning, match="kernel exploded"):
        torch.testing.assert_close(torch.compile(model, backend="hypatia")(x), model(x))
    (repro,) = (tmp_path / "artifacts").glob("*/repros/*.py")
    assert repro.name == "repro-001-executor.py"
    text = repro.read_text()
    assert "EXCEPTION_NAME = 'RuntimeError'" in text
    assert re.search(r"Minified from \d+ operator nodes to 2 ", text), text[:600]  # linear and relu
    code, out = run_here(repro)
    assert code == 1 and "REPRODUCED: RuntimeError: kernel exploded" in out, out
    monkeypatch.undo()
    assert run_here(repro)[0] == 0


def test_a_minifier_problem_never_breaks_the_run(home, dynamo_reset, monkeypatch, tmp_path):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    monkeypatch.setenv("HYPATIA_CHECKSUM_MODE", "strict")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("HYPATIA_ARTIFACTS", str(blocked))  # nothing can be created under it
    plant_wrong(monkeypatch)
    model, x = Net().eval(), torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="hypatia")(x), model(x))
    from hypatia.client import backend

    assert backend.session().counters["regions_failed_validation"] == 1  # ran; the repro's failure only logged


def test_the_package_s_names_are_its_functions_whatever_was_imported_first():
    import importlib

    import hypatia.debug as debug

    for module in ("triggers", "delta", "kernel_diff", "repro", "folder"):
        importlib.import_module(f"hypatia.debug.{module}")
    assert debug.minify.__module__ == "hypatia.debug.delta" and callable(debug.minify)
    assert debug.compare.__module__ == "hypatia.debug.kernel_diff" and debug.minify_model.__module__ == "hypatia.debug.triggers"
    assert set(debug.__all__) <= set(dir(debug))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        debug.nothing  # noqa: B018
