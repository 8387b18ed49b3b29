"""planner.footprint: what a rebuilt graph allocates, found on fake tensors before it runs."""

from __future__ import annotations

import pytest
import torch
import torch.fx

from graphs import canonical
from hypatia.planner import footprint, rebuild


def sized(fn, *inputs) -> footprint.Footprint:
    graph = canonical(fn, *inputs)
    gm, _ = rebuild.graph_module(graph)
    return footprint.footprint(gm, rebuild.input_specs(graph))


def test_views_allocate_nothing_and_overlapping_outputs_count_every_element():
    size = sized(lambda x: (x.t(), x.expand(3, 4, 4)), torch.ones(4, 4))
    assert size.peak == 0
    assert size.outputs == 16 * 4 + 3 * 16 * 4  # the expanded output travels contiguous


def test_a_huge_tensor_from_a_tiny_input_is_seen_without_allocating_it():
    size = sized(lambda x: (torch.relu(x.expand(1 << 28, 4).clone()),), torch.ones(1, 4))
    assert size.outputs == 4 << 30
    assert size.peak == 8 << 30 and "relu" in size.peak_at  # the clone is alive while relu writes


def test_the_peak_follows_what_the_graph_still_holds():
    def chain(x):
        s = x.sum()
        for i in range(4):
            s = s + (x + i).expand(256, 1024).clone().sum()  # each clone is dropped after its sum
        return (s,)

    size = sized(chain, torch.ones(1, 1024))
    assert (1 << 20) <= size.peak < 2 * (1 << 20)
    assert size.outputs == 4


def test_a_data_dependent_size_cannot_be_known_in_advance():
    g = torch.fx.Graph()
    x = g.placeholder("in0")
    g.output((g.call_function(torch.ops.aten.nonzero.default, (x,)),))
    with pytest.raises(footprint.NotSizeable, match="node 1 .*nonzero"):
        footprint.footprint(torch.fx.GraphModule(torch.nn.Module(), g), [([4, 4], "float32")])
