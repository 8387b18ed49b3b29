"""The declared kernel library: one table per op, registered on import (no torch import here).

Every implementation of an op takes the same arguments: the region's input tensors in the
order its rule gives, then the rule's constants. Each places real PyTorch operators in a graph:
a ``hypatia::`` custom op (:mod:`hypatia.kernels.ops`) or the ATen fused op it stands for, as its
description says first.
"""

from __future__ import annotations

from hypatia.kernels.registry import Backend, KernelSpec, register

CPU, GPU, CUPY = Backend.CPU_TORCH, Backend.GPU_TORCH, Backend.GPU_CUPY
_K = "hypatia.kernels"


def _table(op: str, module: str, rows: tuple, places: str = "hypatia") -> tuple[KernelSpec, ...]:
    return tuple(
        register(KernelSpec(op, backend, signature, f"{_K}.{module}:{fn}", text, launches, places))
        for backend, signature, fn, text, launches in rows
    )


# linear + bias + activation: (bias, mat1, mat2, view_shape), as hypatia::addmm_activation.
# cuBLASLt's GELU epilogue is the tanh approximation; torch's CPU _addmm_activation uses erf.
LINEAR_ACTIVATION = _table("linear_activation", "linear_activation", (
    (CPU, "relu", "addmm_relu", "hypatia::addmm_activation: torch._addmm_activation (addmm, relu in place)", 1),
    (CPU, "gelu", "addmm_gelu", "hypatia::addmm_activation: torch._addmm_activation(use_gelu) (erf GELU in place)", 1),
    (CPU, "gelu_tanh", "addmm_gelu_tanh", "hypatia::addmm_activation: addmm, tanh GELU in place", 2),
    (CPU, "silu", "addmm_silu", "hypatia::addmm_activation: addmm, SiLU in place", 2),
    (GPU, "relu", "addmm_relu", "hypatia::addmm_activation: cuBLASLt RELU_BIAS epilogue", 1),
    (GPU, "gelu_tanh", "addmm_gelu_tanh", "hypatia::addmm_activation: cuBLASLt GELU_BIAS epilogue", 1),
    (GPU, "gelu", "addmm_gelu", "hypatia::addmm_activation: addmm, erf GELU in place", 2),
    (GPU, "silu", "addmm_silu", "hypatia::addmm_activation: addmm, SiLU in place (no cuBLASLt SiLU epilogue)", 2),
))

# Linear -> activation -> Linear: (bias1, x, w1t, bias2, w2t, view_shape).
MLP = _table("mlp", "mlp", tuple(
    (backend, act, f"mlp_{act}", f"hypatia::addmm_activation ({act}), then aten::addmm", 2 if act in ("relu", "gelu_tanh") or backend is CPU else 3)
    for backend in (CPU, GPU)
    for act in ("relu", "gelu", "gelu_tanh", "silu")
))

# q @ k^T -> scale -> mask -> softmax -> @ v: (q, k_transposed, v[, masks...[, fill]], scale[, mask_kind, fill]).
ATTENTION = _table("attention", "attention", (
    (CPU, "sdpa", "attention", "aten::scaled_dot_product_attention (flash attention for CPU)", 1),
    (CPU, "sdpa_mask", "attention_masked", "aten::scaled_dot_product_attention with a mask", 1),
    (GPU, "sdpa", "attention", "aten::scaled_dot_product_attention (flash / memory-efficient)", 1),
    (GPU, "sdpa_mask", "attention_masked", "aten::scaled_dot_product_attention with a mask (memory-efficient)", 1),
) + tuple(
    (backend, sig, fn, f"aten::scaled_dot_product_attention, {how}", launches)
    for sig, fn, how, launches in (
        ("sdpa_where", "attention_where", "where() as an additive mask", 3),
        ("sdpa_bias_mask", "attention_bias_mask", "a bias and a mask as one additive mask", 2),
        ("sdpa_keep_add", "attention_keep_add", "where() and a mask as one additive mask", 2),
    )
    for backend in (CPU, GPU)
), places="aten")

# Normalizations and softmax written out by hand -> ATen's fused kernels.
NORMALIZATION = _table("normalization", "normalization", tuple(
    (backend, sig, fn, text, 1)
    for backend in (CPU, GPU)
    for sig, fn, text in (
        ("layer_norm", "layer_norm", "aten::native_layer_norm, weight and bias"),
        ("layer_norm_plain", "layer_norm_plain", "aten::native_layer_norm without affine"),
        ("rms_norm", "rms_norm", "aten::rms_norm with weight"),
        ("rms_norm_plain", "rms_norm_plain", "aten::rms_norm without weight"),
        ("softmax", "softmax", "aten::_softmax, one pass"),
        ("gelu", "gelu", "aten::gelu (erf) in one kernel"),
        ("gelu_tanh", "gelu_tanh", "aten::gelu (tanh) in one kernel"),
    )
), places="aten")

# conv -> batch norm (inference) [-> ReLU]: BN folded into the conv's weights (cached).
CONV_BN = _table("conv_bn", "conv_bn", tuple(
    (backend, sig, fn, text, 1 if sig.endswith("plain") else 2)
    for backend in (CPU, GPU)
    for sig, fn, text in (
        ("plain", "conv_bn", "hypatia::conv_bn: conv with BN folded into its weights"),
        ("relu", "conv_bn_relu", "hypatia::conv_bn: conv with BN folded, ReLU in place"),
        ("bias_plain", "conv_bias_bn", "hypatia::conv_bn: conv (with bias) with BN folded"),
        ("bias_relu", "conv_bias_bn_relu", "hypatia::conv_bn: conv (with bias) with BN folded, ReLU in place"),
    )
))

# Chains of pointwise ops: (inputs..., program), as hypatia::pointwise. CUDA: one kernel generated
# from the program and compiled by NVRTC through cupy (cached by source hash); CPU: through torch.
POINTWISE = _table("pointwise", "ops", (
    (CPU, "generated", "pointwise_torch", "hypatia::pointwise through torch, intermediates in place", 1),
    (GPU, "generated", "pointwise_torch", "hypatia::pointwise through ATen (when cupy is missing)", 4),
    (CUPY, "generated", "pointwise_nvrtc", "hypatia::pointwise as one NVRTC kernel generated from the chain", 1),
))
