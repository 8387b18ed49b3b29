"""conv -> batch norm (inference) [-> ReLU] as one conv whose weights have the BN folded in.

Folding costs a few small ops, so the folded weights are cached per parameter set and
recomputed when any parameter changes (tensor version counters) — e.g. after a weight load.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

_cache: dict[tuple, tuple] = {}
_lock = threading.Lock()
_CACHE_LIMIT = 256


def _stamp(*tensors) -> tuple:
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in tensors)


def fold(weight, conv_bias, gamma, beta, mean, var, eps):
    """(weight', bias') of the conv that computes bn(conv(x))."""
    key = _stamp(*(t for t in (weight, conv_bias, gamma, beta, mean, var) if t is not None)) + (eps,)
    with _lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    scale = gamma.float() * torch.rsqrt(var.float() + eps)
    w = (weight.float() * scale.reshape(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
    shift = beta.float() - mean.float() * scale
    if conv_bias is not None:
        shift = shift + conv_bias.float() * scale
    folded = (w, shift.to(weight.dtype))
    with _lock:
        if len(_cache) >= _CACHE_LIMIT:
            _cache.clear()
        _cache[key] = folded
    return folded


def _conv(x, w, b, stride, padding, dilation, groups):
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
    return conv(x, w, b, stride, padding, dilation, groups)


def conv_bn(x, weight, gamma, beta, mean, var, eps, stride, padding, dilation, groups):
    w, b = fold(weight, None, gamma, beta, mean, var, eps)
    return _conv(x, w, b, stride, padding, dilation, groups)


def conv_bn_relu(x, weight, gamma, beta, mean, var, eps, stride, padding, dilation, groups):
    return conv_bn(x, weight, gamma, beta, mean, var, eps, stride, padding, dilation, groups).relu_()


def conv_bias_bn(x, weight, bias, gamma, beta, mean, var, eps, stride, padding, dilation, groups):
    w, b = fold(weight, bias, gamma, beta, mean, var, eps)
    return _conv(x, w, b, stride, padding, dilation, groups)


def conv_bias_bn_relu(x, weight, bias, gamma, beta, mean, var, eps, stride, padding, dilation, groups):
    return conv_bias_bn(x, weight, bias, gamma, beta, mean, var, eps, stride, padding, dilation, groups).relu_()
