"""Plan -> executable: an FX graph whose fused regions call kernel-library entries.

The plan refers to canonical node indices; the caller gives the FX node of each (capture in the
client, :mod:`hypatia.planner.rebuild` in the daemon's remote mode), so both build the same
executable from the same code. The planned module is built on a copy of the graph, so the
untouched graph stays available as the eager fallback.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from hypatia.kernels import load_kernel
from hypatia.planner.plan import Plan


class PlanMismatch(Exception):
    """A plan does not fit the graph it was served for (corrupt, or from another version)."""


def apply_plan(gm: torch.fx.GraphModule, fx_nodes: list[torch.fx.Node], plan: Plan) -> torch.fx.GraphModule:
    """A new GraphModule computing what ``gm`` computes, with each region as one kernel call."""
    graph = torch.fx.Graph()
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    nodes = [val_map[n] for n in fx_nodes]
    for region in plan.regions:
        indices = [*region.inputs, region.output, *region.nodes]
        if not all(0 <= i < len(nodes) for i in indices) or region.output not in region.nodes:
            raise PlanMismatch(f"region {region.rule} refers to nodes outside this graph")
        members = {nodes[i] for i in region.nodes}
        for i in region.nodes:
            for user in list(nodes[i].users):
                if user in members:
                    continue
                if i != region.output and user.target is operator.getitem and not user.users:
                    graph.erase_node(user)  # an unread half of a tuple result goes with it
                elif i != region.output:
                    raise PlanMismatch(f"region {region.rule}: node {nodes[i].name} is used outside the region")
        fn = load_kernel(region.kernel, region.placement)
        target = nodes[region.output]
        with graph.inserting_before(target):
            call = graph.create_node(
                "call_function", fn, tuple(nodes[i] for i in region.inputs) + tuple(region.consts), {}, name=region.rule
            )
        call.meta = dict(target.meta)
        call.meta["hypatia_rule"] = region.rule
        call.meta["hypatia_kernel"] = region.kernel
        target.replace_all_uses_with(call)
        for i in sorted(region.nodes, reverse=True):
            graph.erase_node(nodes[i])
        nodes[region.output] = call  # a later region may take this one's result as input
    graph.lint()
    return torch.fx.GraphModule(gm, graph)
