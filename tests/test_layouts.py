"""A fused region's output has the layout the unfused ops gave it.

Later nodes of the graph were traced against that layout: a rotary embedding applied to a
transposed query (Llama, Mistral, Qwen2) keeps the transposed layout, as TensorIterator does,
and a later ``view`` works only on it. Pointwise programs carry the layout (``"order"``); any
other kernel that returns another layout is followed by a copy into it.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from graphs import aten_graph
from hypatia.client.capture import capture
from hypatia.kernels import ops
from hypatia.kernels.pointwise import PointwiseProgramError, pointwise_cpu, program_text, validate_program
from hypatia.planner import plan_graph
from hypatia.planner.counters import counters

B, S, H, D = 2, 8, 4, 16


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's shape: heads split off a projection and transposed, the rotation applied, and
    the heads merged back with a ``view`` that only the transposed layout allows."""
    q = x.view(B, S, H, D).transpose(1, 2)
    half = torch.cat((-q[..., D // 2:], q[..., : D // 2]), dim=-1)
    r = q * cos + half * sin
    return r.transpose(1, 2).view(B, S, H * D)


def rotary_inputs(requires_grad: bool = False) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(B, S, H * D, requires_grad=requires_grad), torch.randn(1, 1, S, D), torch.randn(1, 1, S, D)]


def program(order=None, shape=(B, H, S, D)):
    p = {"v": 1, "n_inputs": 2, "ops": [["mul", ["in", 0], ["in", 1]], ["neg", ["v", 0]]], "out": 1,
         "dtype": "float32", "shape": list(shape)}
    return p if order is None else p | {"order": order}


def test_a_program_order_gives_the_output_that_layout_and_the_fake_agrees():
    q = torch.randn(B, S, H, D).transpose(1, 2)
    cos = torch.randn(1, 1, S, D)
    eager = -(q * cos)
    text = program_text(program([0, 2, 1, 3]))
    out = ops.pointwise([q, cos], text, "torch")
    torch.testing.assert_close(out, eager)
    assert out.stride() == eager.stride() == q.stride()
    with FakeTensorMode() as mode:
        fake = ops.pointwise([mode.from_tensor(q), mode.from_tensor(cos)], text, "torch")
    assert fake.stride() == out.stride()
    for result in torch.library.opcheck(ops.pointwise, ([q.double().requires_grad_(), cos.double()],
                                                         program_text(program([0, 2, 1, 3]) | {"dtype": "float64"}),
                                                         "torch")).values():
        assert result == "SUCCESS"
    # without an order the output is row-major, as before
    assert ops.pointwise([q, cos], program_text(program()), "torch").is_contiguous()


@pytest.mark.parametrize("order, message", [([0, 1, 2], "permutation of the output's 4 dims"),
                                            ([0, 1, 1, 3], "permutation"), ("0213", "permutation"),
                                            ([0, 2, 1, 3.0], "permutation")])
def test_a_bad_order_is_rejected_saying_what_it_must_be(order, message):
    with pytest.raises(PointwiseProgramError, match=message):
        validate_program(program(order))


def test_a_row_major_order_is_the_same_program_text_as_none():
    # cached kernels keyed by a program's text stay valid for row-major outputs
    assert "order" not in program_text(program())
    out = pointwise_cpu(torch.randn(B, H, S, D), torch.randn(D), program([0, 1, 2, 3]))
    assert out.is_contiguous()


def test_the_planner_records_the_unfused_layout_in_the_program():
    gm = aten_graph(rotary, *rotary_inputs())
    graph, _ = capture(gm)
    plan = plan_graph(graph)
    programs = [r.consts[0] for r in plan.regions if r.rule == "pointwise_chain"]
    assert programs and all(p.get("order") == [0, 2, 1, 3] for p in programs), programs


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_rotary_embedding_on_a_transposed_query_runs_fused_without_fallback(home, dynamo_reset, monkeypatch, training):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    monkeypatch.setenv("HYPATIA_CHECKSUM_MODE", "strict")
    from hypatia.client.backend import session

    inputs = rotary_inputs(requires_grad=training)
    reference = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    with torch.set_grad_enabled(training):
        out = torch.compile(rotary, backend="hypatia")(*inputs)
        expected = rotary(*reference)
    torch.testing.assert_close(out, expected)
    if training:
        out.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(inputs[0].grad, reference[0].grad)
    c = session().counters
    assert c["fallbacks"] == 0 and c["regions_failed_validation"] == 0, dict(c)
    (_, plan), = session().plans
    assert plan.rules_fired.get("pointwise_chain", 0) >= 1


def test_a_kernel_returning_another_layout_is_followed_by_a_copy(home, dynamo_reset, monkeypatch):
    """Where the kernel cannot give the graph's layout, the rewrite copies into it."""
    import hypatia.planner.rules.pointwise as rule

    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    monkeypatch.setattr(rule, "order_of", lambda shape, stride: None)  # kernels return row-major
    from hypatia.client.backend import session

    before = counters["rewrite.layout_copies"]
    inputs = rotary_inputs()
    out = torch.compile(rotary, backend="hypatia")(*inputs)
    torch.testing.assert_close(out, rotary(*inputs))
    assert session().counters["fallbacks"] == 0 and session().counters["regions_fused"] >= 1
    assert counters["rewrite.layout_copies"] > before


def test_a_region_reading_an_expanded_mask_passes_validation(home, dynamo_reset, monkeypatch):
    """Validation draws an expanded (stride-0) input expanded, as the model has it, instead of
    failing to write random values into it (Llama's causal mask in bf16)."""
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    monkeypatch.setenv("HYPATIA_CHECKSUM_MODE", "strict")
    from hypatia.client.backend import session

    def masked_scores(scores, keep):
        mask = keep[:, None, :, :].expand(B, H, S, S)
        return torch.where(mask, torch.zeros((), dtype=scores.dtype), torch.full((), -1e4, dtype=scores.dtype)) + scores * 0.25

    scores, keep = torch.randn(B, H, S, S, dtype=torch.bfloat16), torch.rand(B, S, S) > 0.5
    out = torch.compile(masked_scores, backend="hypatia")(scores, keep)
    torch.testing.assert_close(out, masked_scores(scores, keep))
    c = session().counters
    assert c["regions_validated"] >= 1 and c["regions_failed_validation"] == 0 and c["fallbacks"] == 0, dict(c)


@pytest.mark.gpu
def test_the_generated_cuda_kernel_writes_the_programs_layout():
    from hypatia.kernels.pointwise_cuda import pointwise_cuda

    q = torch.randn(B, S, H, D, device="cuda").transpose(1, 2)
    cos = torch.randn(1, 1, S, D, device="cuda")
    p = program([0, 2, 1, 3])
    out = pointwise_cuda(q, cos, p)
    assert out.stride() == q.stride()
    torch.testing.assert_close(out, -(q * cos))
    text = program_text(p)
    with FakeTensorMode() as mode:
        fake = ops.pointwise([mode.from_tensor(q), mode.from_tensor(cos)], text, "nvrtc")
    assert fake.stride() == ops.pointwise([q, cos], text, "nvrtc").stride()
