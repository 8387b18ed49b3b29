"""linear + bias + activation as one ``hypatia::addmm_activation`` call; each returns what the
ATen chain returned (the addmm's 2-D result, viewed back to the chain's shape)."""

from __future__ import annotations

from typing import Sequence

import torch

from hypatia.kernels import ops


def _shaped(out: torch.Tensor, shape: Sequence[int] | None) -> torch.Tensor:
    return out if shape is None else out.view(shape)


def addmm_relu(bias, mat1, mat2, shape=None):
    return _shaped(ops.addmm_activation(bias, mat1, mat2, "relu"), shape)


def addmm_gelu(bias, mat1, mat2, shape=None):
    return _shaped(ops.addmm_activation(bias, mat1, mat2, "gelu"), shape)


def addmm_gelu_tanh(bias, mat1, mat2, shape=None):
    return _shaped(ops.addmm_activation(bias, mat1, mat2, "gelu_tanh"), shape)


def addmm_silu(bias, mat1, mat2, shape=None):
    return _shaped(ops.addmm_activation(bias, mat1, mat2, "silu"), shape)
