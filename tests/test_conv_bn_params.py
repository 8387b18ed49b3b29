"""A folded conv + batch norm follows its parameters, however they change.

A fold cached by memory address and version counter served stale weights: a fresh tensor that
lands on a freed tensor's address looked like it, and a change through ``.data`` keeps the
version counter. ``hypatia::conv_bn`` folds on every call; these tests keep it that way.
"""

from __future__ import annotations

import numpy as np
import torch

from hypatia.kernels import ops

EPS = 1e-5


def _bn_params(channels: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gamma = torch.rand(channels, generator=g) + 0.5
    beta = torch.randn(channels, generator=g)
    mean = torch.randn(channels, generator=g)
    var = torch.rand(channels, generator=g) + 0.5
    return [gamma, beta, mean, var]


def _reference(x, w, gamma, beta, mean, var):
    return ops.conv_bn_reference(x, w, None, gamma, beta, mean, var, EPS, [1, 1], [1, 1], [1, 1], 1, True)


def _fused(x, w, gamma, beta, mean, var):
    return ops.conv_bn(x, w, None, gamma, beta, mean, var, EPS, [1, 1], [1, 1], [1, 1], 1, True)


def test_a_new_tensor_at_an_old_tensors_address_and_version_gets_its_own_fold():
    """What a cache keyed by address and version counter took for the old tensor: a fresh
    tensor on the same memory (as an allocator hands a freed block back), version 0 as well,
    holding other values. numpy writes the memory, so no version counter moves."""
    x, w = torch.randn(2, 3, 6, 6), torch.randn(5, 3, 3, 3)
    gamma, beta, mean_values, var = _bn_params(5, 0)
    memory = np.empty(5, dtype=np.float32)
    memory[:] = mean_values.numpy()
    mean = torch.from_numpy(memory)
    torch.testing.assert_close(_fused(x, w, gamma, beta, mean, var), _reference(x, w, gamma, beta, mean, var))
    address, version = mean.data_ptr(), mean._version
    del mean
    memory[:] = np.linspace(-3, 3, 5, dtype=np.float32)
    fresh = torch.from_numpy(memory)
    assert (fresh.data_ptr(), fresh._version) == (address, version)
    torch.testing.assert_close(_fused(x, w, gamma, beta, fresh, var), _reference(x, w, gamma, beta, fresh, var))


def test_a_change_through_data_that_keeps_the_version_counter_is_followed():
    x, w = torch.randn(2, 3, 6, 6), torch.randn(5, 3, 3, 3)
    gamma, beta, mean, var = _bn_params(5, 1)
    gamma = torch.nn.Parameter(gamma)
    with torch.no_grad():
        first = _fused(x, w, gamma, beta, mean, var)
        version = gamma._version
        gamma.data.mul_(3)  # through .data: the parameter's version counter does not move
        assert gamma._version == version
        second = _fused(x, w, gamma, beta, mean, var)
        torch.testing.assert_close(second, _reference(x, w, gamma, beta, mean, var))
    assert not torch.allclose(first, second)


class ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_the_compiled_model_follows_buffers_replaced_in_place_and_out_of_place(home, dynamo_reset, monkeypatch):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    from hypatia.client.backend import session
    from hypatia.planner.counters import counters

    torch.manual_seed(0)
    model = ConvBN().eval()
    gamma, beta, mean, var = _bn_params(8, 2)
    model.bn.weight.data, model.bn.bias.data = gamma, beta
    model.bn.running_mean.copy_(mean)
    model.bn.running_var.copy_(var)
    compiled = torch.compile(model, backend="hypatia")
    x = torch.randn(2, 3, 8, 8)
    before = counters["rule.conv_bn_relu.fired"]
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
        assert counters["rule.conv_bn_relu.fired"] == before + 1
        model.bn.running_mean.add_(1.0)  # in place
        torch.testing.assert_close(compiled(x), model(x))
        model.bn.running_var = torch.rand(8) + 2.0  # out of place: a new tensor
        torch.testing.assert_close(compiled(x), model(x))
        model.bn.weight.data = torch.rand(8) + 0.1  # a new tensor behind the same parameter
        torch.testing.assert_close(compiled(x), model(x))
    assert session().counters["fallbacks"] == 0
