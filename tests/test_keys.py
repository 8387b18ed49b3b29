"""Canonical graphs and keys: what must and must not change a key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from graphs import aten_graph, canonical, key_of
from hypatia.canonical import RawNode, canonicalize, environment_key, workload_key
from hypatia.client.capture import capture, encode_arg, encode_meta


def mlp(x, w1, b1, w2):
    h = torch.nn.functional.linear(x, w1, b1).relu()
    return h @ w2


def mlp_renamed(inp, weight_a, bias_a, weight_b):
    hidden_state = torch.nn.functional.linear(inp, weight_a, bias_a)
    activated = hidden_state.relu()
    return activated @ weight_b


def inputs(dtype=torch.float32, batch=4):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, 8, generator=g, dtype=dtype),
        torch.randn(16, 8, generator=g, dtype=dtype),
        torch.randn(16, generator=g, dtype=dtype),
        torch.randn(16, 4, generator=g, dtype=dtype),
    )


def test_same_model_traced_twice_has_one_key():
    assert key_of(mlp, *inputs()) == key_of(mlp, *inputs())


def test_renamed_variables_and_renamed_nodes_do_not_change_the_key():
    assert key_of(mlp, *inputs()) == key_of(mlp_renamed, *inputs())
    gm = aten_graph(mlp, *inputs())
    before = capture(gm)[0].key
    for i, node in enumerate(gm.graph.nodes):
        if node.op == "call_function":
            node.name = f"some_other_name_{i}"
    assert capture(gm)[0].key == before


def test_trace_order_of_independent_nodes_does_not_change_the_key():
    def first_sin(x, y):
        a = x.sin()
        b = y.cos()
        return a - b

    def first_cos(x, y):
        b = y.cos()
        a = x.sin()
        return a - b

    x, y = torch.randn(3), torch.randn(3)
    assert key_of(first_sin, x, y) == key_of(first_cos, x, y)


def test_commutative_arguments_are_ordered():
    x, y = torch.randn(3), torch.randn(3)
    assert key_of(lambda a, b: torch.add(a.sin(), b.cos()), x, y) == key_of(lambda a, b: torch.add(b.cos(), a.sin()), x, y)
    assert key_of(lambda a, b: a.exp() * b, x, y) == key_of(lambda a, b: b * a.exp(), x, y)
    # not commutative: sub, and add with alpha
    assert key_of(lambda a, b: a.sin() - b.cos(), x, y) != key_of(lambda a, b: b.cos() - a.sin(), x, y)
    assert key_of(lambda a, b: torch.add(a.sin(), b.cos(), alpha=2), x, y) != key_of(
        lambda a, b: torch.add(b.cos(), a.sin(), alpha=2), x, y
    )


def _differences(a, b):
    return a.details().differences(b.details())


def test_different_shapes_dtypes_constants_and_ops_give_different_keys_and_say_why():
    base = canonical(mlp, *inputs())

    other_shape = canonical(mlp, *inputs(batch=5))
    assert other_shape.key != base.key
    assert any(".shape" in line for line in _differences(base, other_shape))

    other_dtype = canonical(mlp, *inputs(dtype=torch.float64))
    assert other_dtype.key != base.key
    assert any(".dtype" in line and "float64" in line for line in _differences(base, other_dtype))

    x = torch.randn(3)
    two, three = canonical(lambda a: a * 2.0, x), canonical(lambda a: a * 3.0, x)
    assert two.key != three.key
    diff = _differences(two, three)
    assert any("args" in line and "2.0" in line and "3.0" in line for line in diff), diff

    relu, sigmoid = canonical(lambda a: a.relu(), x), canonical(lambda a: a.sigmoid(), x)
    assert relu.key != sigmoid.key
    assert any(" op:" in line and "aten.relu.default" in line for line in _differences(relu, sigmoid))


def test_debug_lines_name_every_field():
    graph = canonical(lambda a: a.relu(), torch.randn(2, 3))
    lines = graph.details().debug_lines()
    assert any("node 1 op: 'aten.relu.default'" in line for line in lines), lines
    assert any(".shape: [2, 3]" in line for line in lines)
    assert any(".dtype: 'float32'" in line for line in lines)
    assert any(".device: 'cpu'" in line for line in lines)


def test_constant_tensors_are_keyed_by_content():
    class WithConstant(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.register_buffer("c", torch.full((3,), value))

        def forward(self, x):
            return x + self.c

    g1 = torch.fx.symbolic_trace(WithConstant(1.0))
    g2 = torch.fx.symbolic_trace(WithConstant(2.0))
    for g in (g1, g2):
        for node in g.graph.nodes:
            node.meta["val"] = torch.empty(3)
    assert capture(g1)[0].key != capture(g2)[0].key


def test_no_device_index_in_any_key():
    assert encode_arg(torch.device("cuda", 3), {}) == ["device", "cuda"]
    assert encode_arg(torch.device("cuda", 0), {}) == ["device", "cuda"]
    meta = encode_meta(torch.empty(2, 2, device="meta"))
    assert meta == ["T", [2, 2], [2, 1], "float32", "meta"]
    ekey, details = environment_key({"device_type": "cuda", "device_name": "NVIDIA H100"})
    assert ekey.startswith("e1-")
    assert not any("rank" in name or "index" in name for name, _ in details.fields)


def test_workload_key_follows_shapes_and_strides():
    a = encode_meta(torch.empty(4, 8))
    b = encode_meta(torch.empty(8, 4).t())
    assert workload_key([a])[0] == workload_key([encode_meta(torch.empty(4, 8))])[0]
    assert workload_key([a])[0] != workload_key([b])[0]
    assert any(".stride" in line for line in workload_key([a])[1].differences(workload_key([b])[1]))


def test_wire_form_round_trip_keeps_the_key():
    from hypatia.canonical import CanonicalGraph

    graph = canonical(mlp, *inputs())
    again = CanonicalGraph.from_wire(json.loads(json.dumps(graph.to_wire())))
    assert again.key == graph.key
    assert [n.users for n in again.nodes] == [n.users for n in graph.nodes]


def test_wire_form_refuses_forward_references():
    from hypatia.canonical import CanonicalGraph, GraphFormatError

    bad = {"nodes": [["aten.relu.default", [["n", 1]], {}, None], ["placeholder", [0], {}, None]], "outputs": ["n", 0]}
    with pytest.raises(GraphFormatError, match="not before it"):
        CanonicalGraph.from_wire(bad)


def test_deep_graphs_canonicalize_without_recursion_errors():
    meta = ["T", [4], [1], "float32", "cpu"]
    raw = [RawNode("placeholder", [0], {}, meta)]
    for i in range(6000):
        raw.append(RawNode("aten.sin.default", [["n", i]], {}, meta))
    graph, order = canonicalize(raw, ["l", [["n", 6000]]])
    assert len(graph.nodes) == 6001 and order == list(range(6001))


# -- golden corpus: hand-built graphs whose keys must not drift without a reason ----------
GOLDEN = Path(__file__).parent / "golden" / "keys.json"
T = ["T", [4, 8], [8, 1], "float32", "cpu"]
CORPUS = {
    "relu": ([RawNode("placeholder", [0], {}, T), RawNode("aten.relu.default", [["n", 0]], {}, T)], ["l", [["n", 1]]]),
    "add_commuted": (
        [
            RawNode("placeholder", [0], {}, T),
            RawNode("placeholder", [1], {}, T),
            RawNode("aten.add.Tensor", [["n", 1], ["n", 0]], {}, T),
        ],
        ["l", [["n", 2]]],
    ),
    "linear_gelu": (
        [
            RawNode("placeholder", [0], {}, ["T", [16, 8], [8, 1], "float32", "cpu"]),
            RawNode("placeholder", [1], {}, ["T", [16], [1], "float32", "cpu"]),
            RawNode("placeholder", [2], {}, T),
            RawNode("aten.t.default", [["n", 0]], {}, ["T", [8, 16], [1, 8], "float32", "cpu"]),
            RawNode("aten.addmm.default", [["n", 1], ["n", 2], ["n", 3]], {}, ["T", [4, 16], [16, 1], "float32", "cpu"]),
            RawNode("aten.gelu.default", [["n", 4]], {"approximate": "tanh"}, ["T", [4, 16], [16, 1], "float32", "cpu"]),
        ],
        ["l", [["n", 5]]],
    ),
}


def test_golden_keys_do_not_drift():
    """Regenerate with HYPATIA_UPDATE_GOLDEN=1 only when a key change is intended (bump KEY_VERSION)."""
    keys = {name: canonicalize(raw, out)[0].key for name, (raw, out) in CORPUS.items()}
    if os.environ.get("HYPATIA_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(keys, indent=2, sort_keys=True) + "\n")
    assert keys == json.loads(GOLDEN.read_text())
