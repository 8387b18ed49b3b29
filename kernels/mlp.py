"""Linear -> activation -> Linear: the first GEMM with its activation as an epilogue
(``hypatia::addmm_activation``), then the second GEMM."""

from __future__ import annotations

import torch

from hypatia.kernels import ops


def _mlp(activation, bias1, x, w1t, bias2, w2t, shape):
    out = torch.addmm(bias2, ops.addmm_activation(bias1, x, w1t, activation), w2t)
    return out if shape is None else out.view(shape)


def mlp_relu(bias1, x, w1t, bias2, w2t, shape=None):
    return _mlp("relu", bias1, x, w1t, bias2, w2t, shape)


def mlp_gelu(bias1, x, w1t, bias2, w2t, shape=None):
    return _mlp("gelu", bias1, x, w1t, bias2, w2t, shape)


def mlp_gelu_tanh(bias1, x, w1t, bias2, w2t, shape=None):
    return _mlp("gelu_tanh", bias1, x, w1t, bias2, w2t, shape)


def mlp_silu(bias1, x, w1t, bias2, w2t, shape=None):
    return _mlp("silu", bias1, x, w1t, bias2, w2t, shape)
