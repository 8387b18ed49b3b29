"""The declared kernel library: one table per op, registered on import (no torch import here)."""

from __future__ import annotations

from hypatia.kernels.registry import Backend, KernelSpec, register

_LA = "hypatia.kernels.linear_activation"

# linear + bias + activation, with addmm's inputs (bias, mat1, mat2) and an optional view shape.
# cuBLASLt's GELU epilogue is the tanh approximation; torch's CPU _addmm_activation uses erf.
LINEAR_ACTIVATION = tuple(
    register(KernelSpec("linear_activation", backend, signature, f"{_LA}:{fn}", text))
    for backend, signature, fn, text in (
        (Backend.CPU_TORCH, "relu", "addmm_activation_relu", "torch._addmm_activation (addmm, relu in place)"),
        (Backend.CPU_TORCH, "gelu", "addmm_activation_gelu", "torch._addmm_activation(use_gelu) (erf GELU in place)"),
        (Backend.CPU_TORCH, "gelu_tanh", "addmm_then_gelu_tanh", "addmm, tanh GELU in place"),
        (Backend.GPU_TORCH, "relu", "addmm_activation_relu", "cuBLASLt RELU_BIAS epilogue via torch._addmm_activation"),
        (Backend.GPU_TORCH, "gelu_tanh", "addmm_activation_gelu", "cuBLASLt GELU_BIAS epilogue via torch._addmm_activation"),
        (Backend.GPU_TORCH, "gelu", "addmm_then_gelu", "addmm, erf GELU in place"),
    )
)
