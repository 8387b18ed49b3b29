"""Hypatia's kernels as real PyTorch operators: the ``hypatia`` namespace of ``torch.library``.

A plan places either ATen's own fused operators (SDPA, ``native_layer_norm``, ``_softmax``, ...)
or one of the operators below. Each has a fake implementation, so graphs containing it trace,
export and go through Inductor, and an autograd formula, so training graphs differentiate through
it. Backward passes that need the pre-activation or the unfused ops recompute them (see
:func:`_vjp_of`): these operators exist for the forward pass, and the executor choice measures
whole steps, so a rewrite that makes training slower is not kept.

``opcheck`` tests every operator (``tests/test_ops.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hypatia.kernels.pointwise import (PointwiseCompileError, fake_output, pointwise_cpu, pointwise_torch_reference,
                                       program_of, program_text)

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
ENGINES = ("torch", "nvrtc")  # how hypatia::pointwise runs: torch ops, or one NVRTC kernel through cupy


def _vjp_of(reference: Callable[..., Tensor], tensors: list[Tensor | None], grad: Tensor,
            needed: list[bool]) -> list[Tensor | None]:
    """The gradients of ``reference(*tensors)`` for ``grad``, recomputing it under autograd;
    None where a tensor is absent or needs no gradient."""
    positions = [i for i, (t, need) in enumerate(zip(tensors, needed))
                 if need and t is not None and (t.is_floating_point() or t.is_complex())]
    if not positions:
        return [None] * len(tensors)

    def partial(*chosen: Tensor) -> Tensor:
        full = list(tensors)
        for i, t in zip(positions, chosen):
            full[i] = t
        return reference(*full)

    _, vjp = torch.func.vjp(partial, *(tensors[i] for i in positions))
    grads: list[Tensor | None] = [None] * len(tensors)
    for i, g in zip(positions, vjp(grad)):
        grads[i] = g
    return grads


# -- hypatia::pointwise ----------------------------------------------------------------------


@torch.library.custom_op("hypatia::pointwise", mutates_args=())
def pointwise(inputs: list[Tensor], program: str, engine: str) -> Tensor:
    """A chain of pointwise ops (``program``, the JSON text of a pointwise program) in one
    kernel: generated CUDA through NVRTC (``engine="nvrtc"``, CUDA inputs), or torch ops."""
    if engine not in ENGINES:
        raise ValueError(f"hypatia::pointwise engine {engine!r} is not one of {ENGINES}")
    parsed = program_of(program)
    if engine == "nvrtc" and any(t.is_cuda for t in inputs):
        from hypatia.kernels.pointwise_cuda import pointwise_cuda

        try:
            return pointwise_cuda(*inputs, parsed)
        except PointwiseCompileError:
            pass  # no cupy, or NVRTC refused the source: the same chain through torch
    return pointwise_cpu(*inputs, parsed)


@pointwise.register_fake
def _pointwise_fake(inputs: list[Tensor], program: str, engine: str) -> Tensor:
    device = next((t.device for t in inputs if t.dim() > 0), inputs[0].device)
    return fake_output(program_of(program), device)


def _pointwise_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    tensors, program, _ = inputs
    ctx.save_for_backward(*tensors)
    ctx.program = program


def _pointwise_backward(ctx: Any, grad: Tensor) -> tuple:
    program = program_of(ctx.program)
    tensors = list(ctx.saved_tensors)
    grads = _vjp_of(lambda *xs: pointwise_torch_reference(list(xs), program), tensors, grad, [True] * len(tensors))
    return grads, None, None


pointwise.register_autograd(_pointwise_backward, setup_context=_pointwise_setup)


# -- hypatia::addmm_activation ---------------------------------------------------------------


def _activate(x: Tensor, activation: str, inplace: bool) -> Tensor:
    if activation == "relu":
        return x.relu_() if inplace else x.relu()
    if activation in ("gelu", "gelu_tanh"):
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        return torch.ops.aten.gelu_(x, approximate=approximate) if inplace else F.gelu(x, approximate=approximate)
    if activation == "silu":
        return F.silu(x, inplace=inplace)
    raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")


def _has_epilogue(device: torch.device, activation: str) -> bool:
    """Whether ``torch._addmm_activation`` computes ``activation`` in the GEMM itself here:
    cuBLASLt has RELU and (tanh) GELU epilogues; the CPU path applies ReLU or erf GELU in place."""
    if activation == "relu":
        return True
    return activation == ("gelu_tanh" if device.type == "cuda" else "gelu")


@torch.library.custom_op("hypatia::addmm_activation", mutates_args=())
def addmm_activation(bias: Tensor, mat1: Tensor, mat2: Tensor, activation: str) -> Tensor:
    """``activation(bias + mat1 @ mat2)``: the GEMM's epilogue where cuBLASLt (or ATen's CPU
    path) has one, else the activation in place on the fresh GEMM output."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"hypatia::addmm_activation: activation {activation!r} is not one of {ACTIVATIONS}")
    if _has_epilogue(mat1.device, activation):
        out = torch._addmm_activation(bias, mat1, mat2, use_gelu=activation != "relu")
    else:
        out = _activate(torch.addmm(bias, mat1, mat2), activation, inplace=True)
    return out if out.is_contiguous() else out.contiguous()


@addmm_activation.register_fake
def _addmm_activation_fake(bias: Tensor, mat1: Tensor, mat2: Tensor, activation: str) -> Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"hypatia::addmm_activation: activation {activation!r} is not one of {ACTIVATIONS}")
    torch._check(mat1.dim() == 2 and mat2.dim() == 2, lambda: "hypatia::addmm_activation takes 2-D matrices")
    torch._check(mat1.shape[1] == mat2.shape[0], lambda: "hypatia::addmm_activation: inner dimensions differ")
    return mat1.new_empty((mat1.shape[0], mat2.shape[1]))


def _addmm_activation_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    bias, mat1, mat2, activation = inputs
    ctx.activation = activation
    ctx.bias_shape = bias.shape
    # ReLU's gradient needs only the output's sign; the others recompute the pre-activation.
    ctx.save_for_backward(mat1, mat2, output if activation == "relu" else bias)


def _addmm_activation_backward(ctx: Any, grad: Tensor) -> tuple:
    mat1, mat2, saved = ctx.saved_tensors
    if ctx.activation == "relu":
        g = grad * (saved > 0)
    else:
        pre = torch.addmm(saved, mat1, mat2)
        if ctx.activation == "silu":
            g = torch.ops.aten.silu_backward(grad, pre)
        else:
            g = torch.ops.aten.gelu_backward(grad, pre, approximate="tanh" if ctx.activation == "gelu_tanh" else "none")
    need_bias, need_mat1, need_mat2, _ = ctx.needs_input_grad
    grad_bias = g.sum_to_size(ctx.bias_shape) if need_bias else None
    grad_mat1 = g @ mat2.t() if need_mat1 else None
    grad_mat2 = mat1.t() @ g if need_mat2 else None
    return grad_bias, grad_mat1, grad_mat2, None


addmm_activation.register_autograd(_addmm_activation_backward, setup_context=_addmm_activation_setup)


# -- hypatia::conv_bn ------------------------------------------------------------------------

def fold(weight: Tensor, conv_bias: Tensor | None, gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor,
         eps: float) -> tuple[Tensor, Tensor]:
    """(weight', bias') of the convolution that computes bn(conv(x)) with running statistics.

    Folded on every call, never cached: parameters changed through ``.data`` keep their version
    counter, and a fold recorded in a CUDA graph must follow the parameters on every replay."""
    wide = torch.promote_types(weight.dtype, torch.float32)  # 16-bit weights fold in float32
    scale = gamma.to(wide) * torch.rsqrt(var.to(wide) + eps)
    w = (weight.to(wide) * scale.reshape(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
    shift = beta.to(wide) - mean.to(wide) * scale
    if conv_bias is not None:
        shift = shift + conv_bias.to(wide) * scale
    return w, shift.to(weight.dtype)


def _conv(x: Tensor, w: Tensor, b: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}.get(x.dim())
    if conv is None:
        raise ValueError(f"hypatia::conv_bn takes a 3-, 4- or 5-D input, got {x.dim()}-D")
    return conv(x, w, b, stride, padding, dilation, groups)


def conv_bn_reference(x: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor, beta: Tensor, mean: Tensor,
                      var: Tensor, eps: float, stride, padding, dilation, groups: int, relu: bool) -> Tensor:
    """The unfused ops: conv, batch norm with running statistics, optional ReLU."""
    out = F.batch_norm(_conv(x, weight, bias, stride, padding, dilation, groups), mean, var, gamma, beta, False, 0.0, eps)
    return out.relu() if relu else out


@torch.library.custom_op("hypatia::conv_bn", mutates_args=())
def conv_bn(x: Tensor, weight: Tensor, bias: Optional[Tensor], gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor,
            eps: float, stride: list[int], padding: list[int], dilation: list[int], groups: int, relu: bool) -> Tensor:
    """One convolution whose weights have the (inference) batch norm folded in, ReLU in place."""
    w, b = fold(weight, bias, gamma, beta, mean, var, eps)
    out = _conv(x, w, b, stride, padding, dilation, groups)
    return out.relu_() if relu else out


@conv_bn.register_fake
def _conv_bn_fake(x, weight, bias, gamma, beta, mean, var, eps, stride, padding, dilation, groups, relu):
    return _conv(x, weight, None, stride, padding, dilation, groups)


_CONV_BN_TENSORS = 7  # x, weight, bias, gamma, beta, mean, var


def _conv_bn_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in inputs[:_CONV_BN_TENSORS]))
    ctx.has_bias = inputs[2] is not None
    ctx.rest = inputs[_CONV_BN_TENSORS:]


def _conv_bn_backward(ctx: Any, grad: Tensor) -> tuple:
    tensors: list[Tensor | None] = list(ctx.saved_tensors)
    if not ctx.has_bias:
        tensors[2] = None
    needed = list(ctx.needs_input_grad[:_CONV_BN_TENSORS])
    grads = _vjp_of(lambda *ts: conv_bn_reference(*ts, *ctx.rest), tensors, grad, needed)
    return (*grads, *([None] * len(ctx.rest)))


conv_bn.register_autograd(_conv_bn_backward, setup_context=_conv_bn_setup)


# -- what the kernel library places ----------------------------------------------------------


def pointwise_torch(*args: Any) -> Tensor:
    """A pointwise chain's inputs, then its program: the chain through torch ops."""
    *inputs, program = args
    return pointwise(list(inputs), program_text(program), "torch")


def pointwise_nvrtc(*args: Any) -> Tensor:
    """A pointwise chain's inputs, then its program: one kernel generated for the chain."""
    *inputs, program = args
    return pointwise(list(inputs), program_text(program), "nvrtc")


OPS = (pointwise, addmm_activation, conv_bn)
