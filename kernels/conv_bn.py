"""conv -> batch norm (inference) [-> ReLU] as one ``hypatia::conv_bn`` call: a convolution
whose weights have the batch norm folded in on every call (never cached: see ``ops.fold``)."""

from __future__ import annotations

from hypatia.kernels import ops


def conv_bn(x, weight, gamma, beta, mean, var, eps, stride, padding, dilation, groups):
    return ops.conv_bn(x, weight, None, gamma, beta, mean, var, eps, stride, padding, dilation, groups, False)


def conv_bn_relu(x, weight, gamma, beta, mean, var, eps, stride, padding, dilation, groups):
    return ops.conv_bn(x, weight, None, gamma, beta, mean, var, eps, stride, padding, dilation, groups, True)


def conv_bias_bn(x, weight, bias, gamma, beta, mean, var, eps, stride, padding, dilation, groups):
    return ops.conv_bn(x, weight, bias, gamma, beta, mean, var, eps, stride, padding, dilation, groups, False)


def conv_bias_bn_relu(x, weight, bias, gamma, beta, mean, var, eps, stride, padding, dilation, groups):
    return ops.conv_bn(x, weight, bias, gamma, beta, mean, var, eps, stride, padding, dilation, groups, True)
