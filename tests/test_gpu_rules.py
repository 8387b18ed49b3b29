"""Every fusion family on CUDA: the GPU kernel is planned, and float32 and bfloat16 results
match eager within dtype-aware tolerances (run with `pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch

from graphs import aten_graph
from hypatia.client.capture import capture
from hypatia.planner.executable import apply_plan
from hypatia.planner import plan_graph
from hypatia.planner.counters import counters
from test_rules import CASES, Block

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
ENV = {"device_type": "cuda", "cupy": "present"}


def _to(x, dtype):
    x = x.to("cuda")
    return x.to(dtype) if x.is_floating_point() else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rule,fn,inputs", CASES, ids=[f"{c[0]}-{c[1].__name__}" for c in CASES])
def test_family_on_cuda_matches_eager(rule, fn, inputs, dtype):
    args = [_to(x, dtype) for x in inputs]
    gm = aten_graph(fn, *args)
    graph, fx_nodes = capture(gm)
    before = counters[f"rule.{rule}.fired"]
    plan = plan_graph(graph, env=ENV)
    regions = [r for r in plan.regions if r.rule == rule]
    assert len(regions) == 1 and counters[f"rule.{rule}.fired"] == before + 1, [r.rule for r in plan.regions]
    assert "/gpu_" in regions[0].kernel, regions[0].kernel
    if rule == "pointwise_chain":
        assert regions[0].kernel == "pointwise/gpu_cupy/generated"
    planned = apply_plan(gm, fx_nodes, plan)
    out, expected = planned(*args), fn(*args)
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_conv_bn_relu_on_cuda(home, dynamo_reset, monkeypatch, dtype):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU())
    model[1].running_var.uniform_(0.5, 2)
    model = model.eval().to("cuda", dtype)
    x = torch.randn(4, 16, 28, 28, device="cuda", dtype=dtype)
    before = counters["rule.conv_bn_relu.fired"]
    with torch.no_grad():
        out = torch.compile(model, backend="hypatia")(x)
        torch.testing.assert_close(out, model(x), **TOLERANCE[dtype])
    assert counters["rule.conv_bn_relu.fired"] == before + 1


def test_training_step_with_every_family_on_cuda(home, dynamo_reset, monkeypatch):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    torch.manual_seed(0)
    model, reference = Block().cuda(), Block().cuda()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 8, 32, device="cuda")
    out = torch.compile(model, backend="hypatia")(x)
    expected = reference(x)
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])
    out.square().mean().backward()
    expected.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name, **TOLERANCE[torch.float32])
    from hypatia.client.backend import session

    assert session().counters["fallbacks"] == 0
