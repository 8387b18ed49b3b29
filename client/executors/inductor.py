"""The ``inductor`` executor: Inductor generates code for the rewritten graph (Triton on CUDA,
C++ on CPU), through the same entry point ``backend="inductor"`` uses, so its FX graph and
AOTAutograd caches key the rewritten graph itself. Its rewrite keeps the regions that became
ATen's fused operators (SDPA, layer norm, softmax), which Inductor lowers as its own; a region
that became a ``hypatia::`` operator is left as it was, since Inductor fuses those operators
itself and an opaque call would stop it (and, in training, recompute in its backward).

Hypatia's kernels and rules are part of what the compiled code means, so a post-grad pass
(Inductor's custom graph pass hook) carries their digest as its ``uuid()``: a change to either
misses Inductor's caches instead of reusing code built against the old ones. The pass itself
counts the ``hypatia::`` operators that reach Inductor's lowering.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
import torch._functorch.config
from torch._inductor.custom_graph_pass import CustomGraphPass

from hypatia import __version__
from hypatia.client.graphs import copy_of
from hypatia.client.torch_internals import (dynamo_tracing_context, inductor_compile, remember_static_fakes,
                                           within_tracing_context)

counters: Counter = Counter()


@functools.cache
def library_digest() -> str:
    """A digest of this installation's kernels and rules: Hypatia's part of Inductor's key."""
    import hypatia.kernels
    import hypatia.planner.rules

    h = hashlib.sha256(__version__.encode())
    for package in (hypatia.kernels, hypatia.planner.rules):
        for path in sorted(Path(package.__file__).parent.glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


class HypatiaPass(CustomGraphPass):
    """Inductor's post-grad hook: counts the ``hypatia::`` operators it sees; its ``uuid`` keys
    Inductor's caches on Hypatia's kernels and rules."""

    def __init__(self, digest: str | None = None):
        self.digest = digest or library_digest()

    def __call__(self, graph: torch.fx.Graph) -> None:
        found = sum(1 for n in graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                    and n.target.namespace == "hypatia")
        counters["graphs_lowered"] += 1
        counters["hypatia_ops_lowered"] += found

    def uuid(self) -> str:
        return f"hypatia-{self.digest}"


def config_patches(cudagraphs: bool) -> dict[str, Any]:
    """Inductor's settings for this executor: its default mode, or ``reduce-overhead``'s."""
    patches: dict[str, Any] = {"post_grad_custom_post_pass": HypatiaPass()}
    if cudagraphs:
        patches |= torch._inductor.list_mode_options("reduce-overhead")
    return patches


def build(graphs, inputs: list, cudagraphs: bool) -> Callable[..., Any]:
    """Inductor's compiled code for the rewritten graph (Dynamo's, when no rewrite is left for
    Inductor). A training graph's backward is compiled here too, not at its first backward, so
    that one compile holds all of a graph's code (what the daemon keeps and serves); a candidate
    built on a later call compiles in Dynamo's tracing context, its inputs faked with the static
    sizes Dynamo traced, so that it is the same compile under the same keys as one made during
    Dynamo's."""
    gm = graphs.for_inductor() if graphs.for_inductor is not None else copy_of(graphs.dynamo, graphs.dynamo)
    later = graphs.tracing is not None and dynamo_tracing_context() is None  # a candidate built on a later call
    held = remember_static_fakes(graphs.dynamo, graphs.tracing, inputs) if later else []
    with torch._functorch.config.patch(force_non_lazy_backward_lowering=True), within_tracing_context(graphs.tracing):
        compiled = inductor_compile(gm, inputs, config_patches(cudagraphs))
    del held  # the fake mode's memory of them was needed for the compile alone
    return compiled
