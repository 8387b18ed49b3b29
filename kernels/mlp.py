"""Linear -> activation -> Linear as one library call (the hidden activation never leaves the
first GEMM's epilogue where cuBLASLt has one)."""

from __future__ import annotations

import torch

from hypatia.kernels import linear_activation as la


def _second(hidden, bias2, w2t, shape):
    out = torch.addmm(bias2, hidden, w2t)
    return out if shape is None else out.view(shape)


def mlp_relu(bias1, x, w1t, bias2, w2t, shape=None):
    return _second(la.addmm_activation_relu(bias1, x, w1t), bias2, w2t, shape)


def mlp_gelu(bias1, x, w1t, bias2, w2t, shape=None):
    fn = la.addmm_activation_gelu if x.device.type == "cpu" else la.addmm_then_gelu
    return _second(fn(bias1, x, w1t), bias2, w2t, shape)


def mlp_gelu_tanh(bias1, x, w1t, bias2, w2t, shape=None):
    fn = la.addmm_then_gelu_tanh if x.device.type == "cpu" else la.addmm_activation_gelu
    return _second(fn(bias1, x, w1t), bias2, w2t, shape)


def mlp_silu(bias1, x, w1t, bias2, w2t, shape=None):
    return _second(la.addmm_then_silu(bias1, x, w1t), bias2, w2t, shape)
