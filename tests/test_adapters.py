"""Accelerator adapters: fused regions go to a registered adapter only where its op, dtype and
memory constraints hold; every violation is counted and recorded with its node; without an
adapter nothing changes. The mock adapter runs regions on the CPU."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from hypatia.client.adapters import (AcceleratorAdapter, AdapterError, MockAdapter, adapters, register_adapter,
                                     unregister_adapter)
from hypatia.client.backend import reset_session, session

from conftest import daemon_of_its_own_home

DOCS = Path(__file__).resolve().parent.parent / "docs" / "debugging.md"
# the ATen operators of the MLP's two regions: addmm + gelu, and addmm + relu
MLP_OPS = {"aten.addmm.default", "aten.gelu.default", "aten.relu.default"}


class MLP(torch.nn.Module):
    """fc1 -> GELU -> fc2 -> ReLU: planned as two regions, linear_gelu and linear_relu."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)

    def forward(self, x):
        return torch.relu(self.fc2(self.act(self.fc1(x))))


@pytest.fixture(scope="module")
def daemon_home():
    """One real hypatiad for the module (starting one per test would double its time)."""
    with daemon_of_its_own_home() as config:
        yield config.runtime_dir.parent


@pytest.fixture
def hypatiad(daemon_home, monkeypatch):
    """This process as a client of the module's hypatiad, with a fresh session."""
    for key in [k for k in os.environ if k.startswith("HYPATIA_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HYPATIA_HOME", str(daemon_home))
    monkeypatch.setenv("HYPATIA_EXECUTOR", "aten")
    reset_session()
    yield
    reset_session()


@pytest.fixture(autouse=True)
def no_adapters(dynamo_reset):
    """Every test starts and ends with no adapter registered and Dynamo's caches empty."""
    for adapter in adapters():
        unregister_adapter(adapter)
    yield
    for adapter in adapters():
        unregister_adapter(adapter)


def run_inference(model: torch.nn.Module, x: torch.Tensor, calls: int = 1) -> torch.Tensor:
    """The compiled model's output (``calls`` calls), checked against eager."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="hypatia")
    with torch.no_grad():
        for _ in range(calls):
            out = compiled(x)
        torch.testing.assert_close(out, model(x))
    return out


def placements() -> dict[str, str]:
    """rule -> placement of every region of the session's one plan."""
    ((_, plan),) = session().plans
    return {r.rule: r.placement for r in plan.regions}


def adapter_counters(name: str = "mock") -> dict[str, int]:
    return {k.removeprefix(f"adapter.{name}."): v for k, v in session().counters.items() if k.startswith(f"adapter.{name}.")}


def model_and_input() -> tuple[MLP, torch.Tensor]:
    torch.manual_seed(0)
    return MLP().eval(), torch.randn(16, 32)


def test_a_permissive_adapter_runs_every_region(hypatiad):
    model, x = model_and_input()
    adapter = register_adapter(MockAdapter())
    run_inference(model, x, calls=3)
    assert placements() == {"linear_gelu": "mock", "linear_relu": "mock"}
    assert adapter.stats == {"compiles": 2, "calls": 6}  # two regions, three calls
    assert adapter_counters() == {"regions_placed": 2}
    assert not session().violations and session().counters["fallbacks"] == 0
    # each region reaches the adapter as its unfused ATen nodes
    ops = [sorted(str(n.target) for n in gm.graph.nodes if n.op == "call_function") for gm in adapter.modules]
    assert sorted(ops) == [["aten.addmm.default", "aten.gelu.default"], ["aten.addmm.default", "aten.relu.default"]]


def test_a_missing_op_keeps_its_region_off_the_adapter(hypatiad):
    model, x = model_and_input()
    adapter = register_adapter(MockAdapter(ops=MLP_OPS - {"aten.gelu.default"}))
    run_inference(model, x, calls=2)
    assert placements() == {"linear_gelu": "device", "linear_relu": "mock"}
    assert adapter.stats == {"compiles": 1, "calls": 2}
    assert adapter_counters() == {"violations.op": 1, "regions_refused": 1, "regions_placed": 1}
    (violation,) = session().violations
    assert violation["adapter"] == "mock" and violation["kind"] == "op" and violation["rule"] == "linear_gelu"
    assert violation["op"] == "aten.gelu.default" and violation["node"].startswith("gelu")
    assert "aten.gelu.default" in violation["detail"] and isinstance(violation["index"], int)


def test_a_dtype_the_adapter_does_not_take(hypatiad):
    model, x = model_and_input()
    adapter = register_adapter(MockAdapter(dtypes={torch.float16}))
    run_inference(model, x)
    assert placements() == {"linear_gelu": "device", "linear_relu": "device"}
    assert adapter.stats["compiles"] == 0 and adapter.stats["calls"] == 0
    violations = session().violations
    # one per node of each region (addmm, gelu; addmm, relu): each reads and returns float32
    assert len(violations) == 4 and {v["kind"] for v in violations} == {"dtype"}
    assert sorted(v["op"] for v in violations) == sorted(["aten.addmm.default"] * 2 + ["aten.gelu.default", "aten.relu.default"])
    assert all("float32" in v["detail"] and "float16" in v["detail"] for v in violations)
    assert adapter_counters() == {"violations.dtype": 4, "regions_refused": 2}


def test_a_region_over_the_memory_limit(hypatiad):
    model, x = model_and_input()
    f32 = 4
    # linear_gelu holds x, fc1's bias and weight, then addmm's and gelu's results
    gelu_inputs = (16 * 32 + 64 + 64 * 32) * f32
    gelu_total = gelu_inputs + 2 * 16 * 64 * f32
    # linear_relu holds the GELU's output, fc2's bias and weight, then addmm's and relu's results
    relu_total = (16 * 64 + 16 + 16 * 64) * f32 + 2 * 16 * 16 * f32
    limit = relu_total + 100
    assert relu_total < limit < gelu_inputs
    adapter = register_adapter(MockAdapter(memory_bytes=limit))
    run_inference(model, x)
    assert placements() == {"linear_gelu": "device", "linear_relu": "mock"}
    assert adapter.stats["compiles"] == 1
    (violation,) = session().violations
    assert violation["kind"] == "memory" and violation["rule"] == "linear_gelu"
    # the node at which the region passes the limit: its first, addmm (its inputs alone do)
    assert violation["op"] == "aten.addmm.default"
    assert f"{gelu_total} bytes" in violation["detail"] and str(limit) in violation["detail"]
    assert adapter_counters() == {"violations.memory": 1, "regions_refused": 1, "regions_placed": 1}


def test_the_first_adapter_that_fits_runs_a_region(hypatiad):
    model, x = model_and_input()
    narrow = register_adapter(MockAdapter(name="narrow", ops={"aten.addmm.default", "aten.relu.default"}))
    wide = register_adapter(MockAdapter(name="wide"))
    run_inference(model, x)
    assert placements() == {"linear_gelu": "wide", "linear_relu": "narrow"}
    assert narrow.stats["calls"] == 1 and wide.stats["calls"] == 1
    assert [(v["adapter"], v["kind"]) for v in session().violations] == [("narrow", "op")]


class Columns(MockAdapter):
    """Returns each region's result laid out column-major, as another accelerator might."""

    def compile(self, gm, example_inputs):
        run = super().compile(gm, example_inputs)
        return lambda *args: run(*args).t().contiguous().t()


class Refuses(MockAdapter):
    def compile(self, gm, example_inputs):
        raise RuntimeError("this accelerator cannot compile it")


class WrongShape(MockAdapter):
    def compile(self, gm, example_inputs):
        return lambda *args: gm(*args)[:1]


def test_an_adapter_result_laid_out_otherwise_is_copied_to_the_graphs_layout(hypatiad):
    model, x = model_and_input()
    adapter = register_adapter(Columns())
    run_inference(model, x)
    assert set(placements().values()) == {"mock"} and adapter.stats["calls"] == 2
    assert session().counters["fallbacks"] == 0


def test_an_adapter_that_cannot_compile_leaves_the_region_as_planned(hypatiad):
    model, x = model_and_input()
    register_adapter(Refuses())
    run_inference(model, x)
    assert set(placements().values()) == {"device"}
    assert adapter_counters() == {"compile_failed": 2}


def test_an_adapter_returning_another_shape_makes_the_graph_run_eager(hypatiad):
    model, x = model_and_input()
    register_adapter(WrongShape())
    with pytest.warns(Warning, match="the graph expects"):
        run_inference(model, x)
    assert session().counters["fallbacks"] == 1


def test_no_adapter_changes_nothing_and_unregistering_restores_it(hypatiad):
    model, x = model_and_input()
    before = run_inference(model, x)
    ((_, plan_before),) = session().plans
    assert {r.placement for r in plan_before.regions} == {"device"} and len(plan_before.regions) == 2
    assert not adapter_counters() and not session().violations

    reset_session()
    adapter = register_adapter(MockAdapter())
    run_inference(model, x)
    assert set(placements().values()) == {"mock"}
    unregister_adapter(adapter)
    assert adapters() == ()

    reset_session()
    after = run_inference(model, x)
    ((_, plan_after),) = session().plans
    assert [r.to_dict() for r in plan_after.regions] == [r.to_dict() for r in plan_before.regions]
    assert adapter.stats["calls"] == 2  # only the model's call while it was registered
    assert not adapter_counters() and not session().violations
    torch.testing.assert_close(after, before)


def test_training_graphs_stay_as_planned(hypatiad):
    torch.manual_seed(0)
    model, reference = MLP(), MLP()
    reference.load_state_dict(model.state_dict())
    adapter = register_adapter(MockAdapter())
    x = torch.randn(4, 32)
    out = torch.compile(model, backend="hypatia")(x)
    expected = reference(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert adapter.stats["compiles"] == 0
    assert adapter_counters()["training_skipped"] == len(session().plans[0][1].regions) >= 1
    assert all(r.placement == "device" for _, plan in session().plans for r in plan.regions)


def test_registration_rules():
    class Bare(AcceleratorAdapter):
        pass

    bare = Bare(name="bare", dtypes=[torch.float32, "bfloat16"], ops=["aten.mm.default"])
    assert bare.dtypes == frozenset({"float32", "bfloat16"}) and bare.ops == frozenset({"aten.mm.default"})
    with pytest.raises(NotImplementedError):
        bare.compile(None, [])
    for name in ("host", "device", "a.b", ""):
        with pytest.raises(AdapterError):
            MockAdapter(name=name)
    register_adapter(MockAdapter())
    register_adapter(adapters()[0])  # the same object again: no change
    with pytest.raises(AdapterError):
        register_adapter(MockAdapter())  # another one of the same name
    with pytest.raises(AdapterError):
        register_adapter(object())
    unregister_adapter("mock")
    assert adapters() == ()


def test_the_documented_example_runs(hypatiad, capsys):
    text = DOCS.read_text()
    section = text[text.index("## Writing an accelerator adapter"):]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)[:1]
    exec(compile(code, str(DOCS), "exec"), {"__name__": "docs_example"})
    printed = capsys.readouterr().out
    assert "'adapter.myaccel.regions_placed': 1" in printed and "'kind': 'op'" in printed
    assert adapters() == ()
