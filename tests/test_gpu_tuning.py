"""The tuner on a GPU: every implementation of every candidate (device backends, the host
path, eager ATen) is measured with CUDA events, and the plan takes the measured-fastest one
that passed its accuracy check (run with `pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch

from graphs import aten_graph
from hypatia.client.capture import capture, graph_workload_key
from hypatia.planner.executable import apply_plan
from hypatia.planner import plan_graph, tuner
from hypatia.planner.environment import describe
from hypatia.planner.plan import EAGER, region_key
from hypatia.planner.store import Store

pytestmark = pytest.mark.gpu


def chain_and_norm(x, w, b, g, beta):
    y = torch.nn.functional.linear(x, w, b)
    y = torch.sigmoid(y) * y * 1.5 + 0.25  # a pointwise chain: gpu_torch, gpu_cupy, host
    mu = y.mean(-1, keepdim=True)
    var = ((y - mu) ** 2).mean(-1, keepdim=True)
    return (y - mu) / torch.sqrt(var + 1e-5) * g + beta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [64, 8192])
def test_tuner_picks_the_measured_fastest_implementation(tmp_path, dtype, rows):
    inputs = [t.to("cuda", dtype) for t in (torch.randn(rows, 256), torch.randn(512, 256), torch.randn(512),
                                            torch.randn(512), torch.randn(512))]
    gm = aten_graph(chain_and_norm, *inputs)
    graph, fx_nodes = capture(gm)
    env_key, env = describe("cuda", torch.cuda.current_device())
    wkey, workload = graph_workload_key(inputs)
    keys = (graph.key, wkey, env_key)
    store = Store(tmp_path / "s.sqlite")
    store.put_plan(keys, graph.to_wire(), workload, env, plan_graph(graph, env=env), [])
    plan = tuner.tune(graph, keys, env, store, budget_s=0.05)
    assert plan.tuned and plan.decisions
    ceilings = store.ceilings(env_key)
    assert ceilings["cuda"]["bytes_per_s"] > 1e11 and ceilings["cuda"]["flops_per_s"] > 1e12
    assert ceilings["transfer_bytes_per_s"] > 1e9
    traces = store.query("SELECT region_key, implementation_id, median_us, ok FROM benchmark_traces")
    impls = {t[1] for t in traces}
    assert "pointwise/gpu_cupy/generated" in impls and "pointwise/cpu_torch/generated@host" in impls and EAGER in impls
    by_region: dict[str, dict[str, float]] = {}
    for rkey, impl, median, ok in traces:
        if ok:
            by_region.setdefault(rkey, {})[impl] = median
    chosen = {(r.output, r.rule): r for r in plan.regions}
    for d in plan.decisions:
        assert d.measured
        region = next(c for c in plan.regions if c.output == d.output) if d.chosen != EAGER else None
        rkey = region_key(graph, region) if region is not None else None
        if rkey is None:  # eager: no single fused implementation of this candidate beat it
            continue
        fastest = min(by_region[rkey], key=by_region[rkey].get)
        assert d.chosen == fastest, (d, by_region[rkey])
    # the tuned plan runs and matches eager
    planned = apply_plan(gm, fx_nodes, plan)
    # bf16: the two computations may round a value one or two bf16 ulps apart (0.03 at 4.0)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=1e-1)
    with torch.no_grad():
        torch.testing.assert_close(planned(*inputs), chain_and_norm(*inputs), **tol)
    assert set(chosen) == {(r.output, r.rule) for r in plan.regions}
