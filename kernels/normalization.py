"""Layer norm, RMS norm, softmax and GELU written out by hand -> ATen's one-kernel versions."""

from __future__ import annotations

import torch.nn.functional as F


def layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def layer_norm_plain(x, eps):
    return F.layer_norm(x, x.shape[-1:], None, None, eps)


def rms_norm(x, weight, eps):
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def rms_norm_plain(x, eps):
    return F.rms_norm(x, x.shape[-1:], None, eps)


def softmax(x, dim):
    return F.softmax(x, dim)


def gelu(x):
    return F.gelu(x)


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")
