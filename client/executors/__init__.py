"""The executors a graph can run under, and the candidates the choice measures.

Each executor is one module with one job, and all take the same :class:`Graphs`:

- ``eager``: Dynamo's graph as it is;
- ``aten``: the rewritten graph of ATen and ``hypatia::`` operators, run operator by operator
  (autograd differentiates it through the operators' formulas);
- ``inductor``: Inductor generates code for the rewritten graph (Triton on CUDA, C++ on CPU);
- ``cudagraphs``: any of the three captured and replayed as CUDA graphs, where that is safe.

A candidate is an executor, with ``+cudagraphs`` when it is captured: ``"inductor+cudagraphs"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx

from hypatia.client.executors import aten, cudagraphs, eager, inductor
from hypatia.executors import CUDAGRAPHS, DEFAULT, EXECUTORS, UnknownCandidate, parse

__all__ = ["CUDAGRAPHS", "DEFAULT", "EXECUTORS", "Graphs", "UnknownCandidate", "build", "candidates", "parse"]


@dataclass
class Graphs:
    """What every executor takes: Dynamo's graph, its example inputs, and (when a plan
    rewrote it) factories of fresh copies of the rewritten graph: with every region, and with
    the regions Inductor sees through (None where that leaves Dynamo's graph)."""

    dynamo: torch.fx.GraphModule
    example_inputs: list
    device: str
    training: bool
    rewritten: Callable[[], torch.fx.GraphModule] | None = None
    for_inductor: Callable[[], torch.fx.GraphModule] | None = None
    skipped: list[str] = field(default_factory=list)  # why torch's own CUDA graph checks refused
    # share(candidate, direct, compile) -> compile() through the daemon's compiled code
    # (direct: Inductor is given Dynamo's graph); None: every compile is this process's own
    share: Callable[[str, bool, Callable[[], Callable[..., Any]]], Callable[..., Any]] | None = None
    tracing: Any = None  # Dynamo's tracing context, for compiles made after Dynamo's own


def candidates(graphs: Graphs, refusal: str | None) -> list[str]:
    """Every candidate for ``graphs``, the default first. ``aten`` is left out when nothing was
    rewritten (it would be eager again); CUDA graphs where ``refusal`` rules them out."""
    names = [DEFAULT] + [e for e in EXECUTORS if e != DEFAULT and (e != "aten" or graphs.rewritten is not None)]
    return [n + suffix for n in names for suffix in ("", CUDAGRAPHS) if not suffix or cudagraphs.allows(refusal, n)]


def build(candidate: str, graphs: Graphs, args: list | None = None) -> Callable[..., Any]:
    """The callable that runs ``candidate``; ``args`` are this call's inputs when it is built
    after Dynamo's compile (the example inputs otherwise)."""
    executor, captured = parse(candidate)
    inputs = list(args) if args is not None else graphs.example_inputs
    if executor == "inductor":
        if graphs.share is None:
            return inductor.build(graphs, inputs, cudagraphs=captured)
        return graphs.share(candidate, graphs.for_inductor is None,
                            lambda: inductor.build(graphs, inputs, cudagraphs=captured))
    source = aten.graph(graphs) if executor == "aten" else eager.graph(graphs)
    if captured:
        return cudagraphs.capture(source, inputs, graphs.skipped.append)
    return source.forward
