"""linear + bias + activation in one library call; each returns what the ATen chain returned.

They run inside AOTAutograd's compiled forward, where autograd is off, so activations may be
applied in place on the fresh addmm output.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _shaped(out: torch.Tensor, shape: Sequence[int] | None) -> torch.Tensor:
    return out if shape is None else out.view(shape)


def addmm_activation_relu(bias, mat1, mat2, shape=None):
    return _shaped(torch._addmm_activation(bias, mat1, mat2), shape)


def addmm_activation_gelu(bias, mat1, mat2, shape=None):
    return _shaped(torch._addmm_activation(bias, mat1, mat2, use_gelu=True), shape)


def addmm_then_gelu(bias, mat1, mat2, shape=None):
    out = torch.addmm(bias, mat1, mat2)
    return _shaped(torch.ops.aten.gelu_(out), shape)


def addmm_then_gelu_tanh(bias, mat1, mat2, shape=None):
    out = torch.addmm(bias, mat1, mat2)
    return _shaped(torch.ops.aten.gelu_(out, approximate="tanh"), shape)


def addmm_then_silu(bias, mat1, mat2, shape=None):
    out = torch.addmm(bias, mat1, mat2)
    return _shaped(torch.nn.functional.silu(out, inplace=True), shape)
