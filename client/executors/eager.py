"""The ``eager`` executor: Dynamo's graph as it is, every operator dispatched by PyTorch as the
model's own code would (autograd included). It is always a candidate, so the measured choice is
never slower than eager."""

from __future__ import annotations

import torch.fx


def graph(graphs) -> torch.fx.GraphModule:
    return graphs.dynamo
