"""GPU paths (run on a CUDA machine with `make test-gpu` / `pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch

from graphs import aten_graph
from hypatia.client.capture import capture
from hypatia.planner.executable import apply_plan
from hypatia.planner import plan_graph

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
ACTS = {
    "linear_relu": lambda y: y.relu(),
    "linear_gelu": lambda y: torch.nn.functional.gelu(y),
    "linear_gelu_tanh": lambda y: torch.nn.functional.gelu(y, approximate="tanh"),
}
KERNELS = {
    "linear_relu": "linear_activation/gpu_torch/relu",
    "linear_gelu": "linear_activation/gpu_torch/gelu",
    "linear_gelu_tanh": "linear_activation/gpu_torch/gelu_tanh",
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rule", list(ACTS))
def test_cuda_region_uses_the_gpu_kernel_and_matches_eager(rule, dtype):
    act = ACTS[rule]
    x = torch.randn(8, 128, 256, device="cuda", dtype=dtype)
    w = torch.randn(512, 256, device="cuda", dtype=dtype) / 16
    b = torch.randn(512, device="cuda", dtype=dtype)

    def fn(x, w, b):
        return act(torch.nn.functional.linear(x, w, b))

    gm = aten_graph(fn, x, w, b)
    graph, fx_nodes = capture(gm)
    plan = plan_graph(graph)
    assert [(r.rule, r.kernel) for r in plan.regions] == [(rule, KERNELS[rule])]
    planned = apply_plan(gm, fx_nodes, plan)
    torch.testing.assert_close(planned(x, w, b), fn(x, w, b), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_training_step_through_the_backend(home, dynamo_reset, monkeypatch, dtype):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(256, 1024), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(1024, 256), torch.nn.ReLU()
        ).to("cuda", dtype)

    model, reference = make(), make()
    x = torch.randn(16, 64, 256, device="cuda", dtype=dtype)
    out = torch.compile(model, backend="hypatia")(x)
    expected = reference(x)
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    out.float().square().mean().backward()
    expected.float().square().mean().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOLERANCE[dtype])
    from hypatia.client.backend import session

    assert session().counters["regions_fused"] >= 1 and session().counters["fallbacks"] == 0
