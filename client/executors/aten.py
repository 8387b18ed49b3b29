"""The ``aten`` executor: the rewritten graph of ATen and ``hypatia::`` operators, run operator
by operator. Autograd differentiates it through each operator's own formula, so the same graph
serves inference and training."""

from __future__ import annotations

import torch.fx


def graph(graphs) -> torch.fx.GraphModule:
    if graphs.rewritten is None:
        raise ValueError("the aten executor needs a rewritten graph; without one it is eager")
    return graphs.rewritten()
