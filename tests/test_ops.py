"""Hypatia's kernels are real PyTorch operators: every ``hypatia::`` op passes ``opcheck`` (schema,
fake tensor, autograd registration, AOT dispatch) and ``gradcheck``, and every kernel-library
entry, traced, is nothing but ``hypatia::`` and ATen operators."""

from __future__ import annotations

import operator

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from hypatia.kernels import all_kernels, ops
from hypatia.kernels.pointwise import program_text

F64 = torch.float64


def _program(n_inputs, op_list, shape, dtype="float32"):
    return {"v": 1, "n_inputs": n_inputs, "ops": op_list, "out": len(op_list) - 1, "dtype": dtype, "shape": shape}


POINTWISE = {
    "mul_gelu_add": (_program(2, [["mul", ["in", 0], ["in", 1]], ["gelu", ["v", 0]], ["add", ["v", 1], ["c", 1.0]]],
                              [4, 8], "float64"), [(4, 8), (8,)]),
    "where_relu": (_program(2, [["gt", ["in", 0], ["c", 0.0]], ["relu", ["in", 1]], ["where", ["v", 0], ["v", 1], ["in", 0]]],
                            [3, 5], "float64"), [(3, 5), (3, 5)]),
    "silu_tanh_cast": (_program(1, [["silu", ["in", 0]], ["tanh", ["v", 0]], ["cast", ["v", 1], "float64"]], [6], "float64"),
                       [(6,)]),
}


@pytest.mark.parametrize("case", sorted(POINTWISE))
def test_pointwise_op_passes_opcheck_and_gradcheck(case):
    program, shapes = POINTWISE[case]
    text = program_text(program)
    xs = [torch.randn(s, dtype=F64, requires_grad=True) for s in shapes]
    for result in torch.library.opcheck(ops.pointwise, (xs, text, "torch")).values():
        assert result == "SUCCESS"
    assert torch.autograd.gradcheck(lambda *t: ops.pointwise(list(t), text, "torch"), tuple(xs))


def test_pointwise_float32_matches_the_unfused_ops_and_nvrtc_falls_back_on_cpu():
    program, _ = POINTWISE["mul_gelu_add"]
    program = dict(program, dtype="float32")
    a, b = torch.randn(4, 8), torch.randn(8)
    expected = torch.nn.functional.gelu(a * b) + 1.0
    for engine in ops.ENGINES:  # nvrtc on CPU tensors runs the chain through torch
        torch.testing.assert_close(ops.pointwise([a, b], program_text(program), engine), expected)
    with pytest.raises(ValueError, match="engine"):
        ops.pointwise([a, b], program_text(program), "bogus")


@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_addmm_activation_passes_opcheck_and_gradcheck(activation):
    bias, mat1, mat2 = (torch.randn(6, dtype=F64, requires_grad=True), torch.randn(4, 8, dtype=F64, requires_grad=True),
                        torch.randn(8, 6, dtype=F64, requires_grad=True))
    for result in torch.library.opcheck(ops.addmm_activation, (bias, mat1, mat2, activation)).values():
        assert result == "SUCCESS"
    assert torch.autograd.gradcheck(lambda b, x, w: ops.addmm_activation(b, x, w, activation), (bias, mat1, mat2))
    pre = torch.addmm(bias, mat1, mat2)
    expected = {"relu": pre.relu(), "gelu": torch.nn.functional.gelu(pre), "silu": torch.nn.functional.silu(pre),
                "gelu_tanh": torch.nn.functional.gelu(pre, approximate="tanh")}[activation]
    torch.testing.assert_close(ops.addmm_activation(bias, mat1, mat2, activation), expected)


def test_addmm_activation_refuses_an_unknown_activation():
    with pytest.raises(ValueError, match="not one of"):
        ops.addmm_activation(torch.randn(3), torch.randn(2, 4), torch.randn(4, 3), "tanh")


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_conv_bn_passes_opcheck_and_gradcheck_and_matches_the_unfused_ops(bias, relu):
    x, w = torch.randn(2, 3, 6, 6, dtype=F64, requires_grad=True), torch.randn(4, 3, 3, 3, dtype=F64, requires_grad=True)
    b = torch.randn(4, dtype=F64, requires_grad=True) if bias else None
    gamma, beta = torch.rand(4, dtype=F64, requires_grad=True), torch.randn(4, dtype=F64, requires_grad=True)
    mean, var = torch.randn(4, dtype=F64), torch.rand(4, dtype=F64) + 0.5
    rest = (1e-5, [1, 1], [1, 1], [1, 1], 1, relu)
    args = (x, w, b, gamma, beta, mean, var, *rest)
    # the dynamic-shape AOT check compiles the op (half a minute on two cores): once, on the full case
    utils = None if (bias and relu) else ("test_schema", "test_autograd_registration", "test_faketensor")
    for result in torch.library.opcheck(ops.conv_bn, args, **({} if utils is None else {"test_utils": utils})).values():
        assert result == "SUCCESS"
    torch.testing.assert_close(ops.conv_bn(*args), ops.conv_bn_reference(*args))
    differentiable = (x, w, gamma, beta) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(
        lambda x, w, g, be, *bb: ops.conv_bn(x, w, bb[0] if bb else None, g, be, mean, var, *rest), differentiable)


def test_conv_bn_folds_the_parameters_as_they_are_at_each_call():
    """No stale fold: a weight changed through ``.data`` (its version counter unchanged) is
    seen by the next call."""
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    gamma, beta, mean, var = torch.rand(3) + 0.5, torch.randn(3), torch.randn(3), torch.rand(3) + 0.5
    rest = (1e-5, [1, 1], [0, 0], [1, 1], 1, False)
    ops.conv_bn(x, w, None, gamma, beta, mean, var, *rest)
    w.data.mul_(2.0)
    torch.testing.assert_close(ops.conv_bn(x, w, None, gamma, beta, mean, var, *rest),
                               ops.conv_bn_reference(x, w, None, gamma, beta, mean, var, *rest))


def _example_args(spec) -> tuple | None:
    """Inputs for a kernel entry, by its op (None where the entry needs a GPU)."""
    op, sig = spec.op, spec.signature
    if spec.backend.value != "cpu_torch":
        return None
    if op == "linear_activation":
        return (torch.randn(6), torch.randn(4, 8), torch.randn(8, 6), [2, 2, 6])
    if op == "mlp":
        return (torch.randn(6), torch.randn(4, 8), torch.randn(8, 6), torch.randn(5), torch.randn(6, 5), None)
    if op == "attention":
        q, kt, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 8, 4), torch.randn(2, 3, 4, 8)
        if sig == "sdpa":
            return (q, kt, v, 0.5)
        if sig == "sdpa_mask":
            return (q, kt, v, torch.randn(4, 4), 0.5, "add", 0.0)
        if sig == "sdpa_bias_mask":
            return (q, kt, v, torch.randn(1, 3, 4, 4), torch.randn(2, 1, 1, 4), 0.5)
        if sig == "sdpa_keep_add":
            return (q, kt, v, torch.rand(4, 4) > 0.3, torch.randn(2, 1, 1, 4), 0.5, -3.4e38)
        return (q, kt, v, torch.rand(4, 4) > 0.3, torch.tensor(-1e4), 0.5)
    if op == "normalization":
        x = torch.randn(3, 8)
        return {"layer_norm": (x, torch.randn(8), torch.randn(8), 1e-5), "layer_norm_plain": (x, 1e-5),
                "rms_norm": (x, torch.randn(8), 1e-6), "rms_norm_plain": (x, 1e-6), "softmax": (x, -1),
                "gelu": (x,), "gelu_tanh": (x,)}[sig]
    if op == "conv_bn":
        x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
        bn = (torch.rand(3) + 0.5, torch.randn(3), torch.randn(3), torch.rand(3) + 0.5, 1e-5, [1, 1], [1, 1], [1, 1], 1)
        return (x, w, *bn) if not sig.startswith("bias") else (x, w, torch.randn(3), *bn)
    if op == "pointwise":
        return (torch.randn(4, 8), torch.randn(8), POINTWISE["mul_gelu_add"][0] | {"dtype": "float32"})
    raise AssertionError(f"no example inputs for kernel op {op!r}: add them here")


@pytest.mark.parametrize("spec", [s for s in all_kernels() if s.backend.value == "cpu_torch"], ids=lambda s: s.id)
def test_every_kernel_entry_places_only_operators(spec):
    """Traced, a kernel-library entry is ``hypatia::`` and ATen operators and nothing else, so a
    rewritten graph is an ordinary graph of operators."""
    args = _example_args(spec)
    kernel = spec.load()
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    rest = {i: a for i, a in enumerate(args) if not isinstance(a, torch.Tensor)}

    def call(*ts):
        it = iter(ts)
        return kernel(*[rest[i] if i in rest else next(it) for i in range(len(args))])

    gm = make_fx(call)(*tensors)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    assert calls, gm.graph
    for n in calls:
        assert isinstance(n.target, torch._ops.OpOverload) and n.target.namespace in ("aten", "hypatia"), n.target
    assert spec.description.startswith(("hypatia::", "aten::")), spec.description  # says what it places
    torch.testing.assert_close(gm(*tensors), call(*tensors))
