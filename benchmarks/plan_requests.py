"""Plan requests built from real models: the bodies the backend sends to hypatiad.

A model is compiled with Dynamo and AOTAutograd exactly as ``backend="hypatia"`` compiles it,
but the graphs AOTAutograd hands over are recorded instead of planned; each becomes the
``get_plan`` body a compile sends first and the ``make_plan`` body it sends on a miss
(``Session._ask_daemon`` in ``client/backend.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.fx
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from benchmarks.workloads import by_name, loss_of
from hypatia.client import capture as cap
from hypatia.planner import environment


@dataclass(frozen=True)
class PlanRequest:
    """One canonical graph with its keys, workload and environment, named after where it came from."""

    source: str  # e.g. "mlp_small/training/b4/backward"
    nodes: int
    graph_key: str
    workload_key: str
    env_key: str
    graph: dict  # CanonicalGraph.to_wire()
    workload: list
    environment: dict

    def get_plan(self, policy: str) -> dict:
        """The lookup body: keys and policy only."""
        return {"graph_key": self.graph_key, "workload_key": self.workload_key, "env_key": self.env_key,
                "policy": policy}

    def make_plan(self, policy: str) -> dict:
        """The body of a miss: the lookup plus what the daemon needs to plan (it re-hashes and checks the keys)."""
        return self.get_plan(policy) | {"graph": self.graph, "workload": self.workload,
                                        "environment": self.environment}


def plan_request(gm: torch.fx.GraphModule, example_inputs: list[Any], source: str) -> PlanRequest:
    """The request the backend builds for one AOTAutograd graph and its example inputs."""
    graph, _ = cap.capture(gm)
    wkey, workload = cap.graph_workload_key(example_inputs)
    device = cap.graph_device(graph)
    index = next((x.device.index or 0 for x in example_inputs
                  if isinstance(x, torch.Tensor) and x.device.type == device), 0)
    ekey, env = environment.describe(device, index)
    return PlanRequest(source, len(graph.nodes), graph.key, wkey, ekey, graph.to_wire(), workload, env)


def model_requests(workload: str, batch: int, training: bool, device: str = "cpu") -> list[PlanRequest]:
    """The requests one compile of a benchmark workload sends: forward and backward in training,
    one inference graph otherwise."""
    recorded: list[tuple[str, torch.fx.GraphModule, list]] = []

    def recorder(phase: str):
        def compile_graph(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
            recorded.append((phase, gm, list(example_inputs)))
            return make_boxed_func(gm.forward)
        return compile_graph

    w = by_name(workload)
    torch._dynamo.reset()  # a fresh compile, so every batch size is its own static-shape graph
    torch.manual_seed(0)
    dev = torch.device(device)
    model = w.build().to(dev).train(training)
    inputs = w.make_inputs(batch, dev, torch.float32)
    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"),
                           inference_compiler=recorder("inference"))
    compiled = torch.compile(model, backend=backend, dynamic=False)
    if training:
        loss_of(compiled(*inputs)).backward()
    else:
        with torch.no_grad():
            compiled(*inputs)
    torch._dynamo.reset()
    mode = "training" if training else "inference"
    return [plan_request(gm, ex, f"{workload}/{mode}/b{batch}/{phase}") for phase, gm, ex in recorded]


def distinct_requests(count: int, sources: Iterable[tuple[str, bool]], exclude: Iterable[str] = ()) -> list[PlanRequest]:
    """``count`` requests for graphs that are all different (by graph key) and not in ``exclude``:
    the ``sources`` (workload, training) compiled at batch 1, 2, 3, ... in turn."""
    seen = set(exclude)
    found: list[PlanRequest] = []
    for request in _by_batch(tuple(sources)):
        if request.graph_key not in seen:
            seen.add(request.graph_key)
            found.append(request)
            if len(found) == count:
                break
    return found


def _by_batch(sources: tuple[tuple[str, bool], ...]) -> Iterator[PlanRequest]:
    batch = 0
    while sources:
        batch += 1
        for workload, training in sources:
            yield from model_requests(workload, batch, training)
