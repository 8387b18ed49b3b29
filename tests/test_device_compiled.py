"""``torch.compile(model, backend="hypatia")`` on a model on the hypatia device, against a real
hypatiad: each call is recorded as one graph (forward, and backward in training), not op by op,
and the results match the same model run eagerly on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from device_helpers import config, rec  # noqa: F401  (fixtures)


class _WithFactories(torch.nn.Module):
    """What transformers' models do in their forward: positions from ``arange``, a cache made
    empty with ``torch.tensor([])`` and grown with ``cat``, a mask from ``full``."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.pos = torch.nn.Embedding(16, 8)

    def forward(self, x):
        positions = torch.arange(x.shape[1], device=x.device)
        h = self.proj(x) + self.pos(positions)
        cache = torch.tensor([], dtype=h.dtype, device=h.device).view(x.shape[0], 0, h.shape[2])
        keys = torch.cat([cache, h], dim=1)
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf"), device=x.device).triu(1)
        return ((keys @ h.transpose(1, 2)) + mask).softmax(-1) @ h


def test_a_compiled_model_on_the_device_ships_whole_graphs_and_matches(rec, dynamo_reset):
    """Under torch.compile a model on the device is traced by Dynamo and AOTAutograd through the
    hypatia tensor subclass, and each call is recorded as one graph, not op by op: the client
    intercepts only the moves in and out, and the result matches eager on the CPU."""
    from hypatia.device import compiled as device_compiled

    torch.manual_seed(4)
    for ref in (torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.LayerNorm(8)), _WithFactories()):
        model = copy.deepcopy(ref).to("hypatia")
        compiled = torch.compile(model, backend="hypatia")
        graphs = device_compiled.counters["graphs_compiled"]
        with torch.no_grad():
            x = torch.randn(2, 5, 8)
            torch.testing.assert_close(compiled(x.to("hypatia")).cpu(), ref(x))  # the first call compiles
            before = rec.counters
            for _ in range(3):
                x = torch.randn(2, 5, 8)
                torch.testing.assert_close(compiled(x.to("hypatia")).cpu(), ref(x), rtol=1e-5, atol=1e-5)
            after = rec.counters
        assert device_compiled.counters["graphs_compiled"] == graphs + 1
        assert after["compiled_calls"] - before["compiled_calls"] == 3
        assert after["compiled_ops"] - before["compiled_ops"] >= 3 * 4  # whole graphs of several ops each
        # per call only the batch's move in and the result's move out reach the dispatcher
        assert after["ops_intercepted"] - before["ops_intercepted"] <= 3 * 3, (before, after)
        assert after["ops_on_client"] - before["ops_on_client"] == 0


def test_a_compiled_training_step_on_the_device_records_forward_and_backward_whole_and_matches(rec, dynamo_reset):
    """A training loop under torch.compile on the device: AOTAutograd's forward and backward are
    each one recorded call per step (the gradients of the loss, taken by autograd outside the
    graph, name their storage on the device), and the loop matches the same loop on the CPU."""
    from hypatia.device import compiled as device_compiled

    torch.manual_seed(5)
    ref = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    model = copy.deepcopy(ref).to("hypatia")
    compiled = torch.compile(model, backend="hypatia")
    opts = [torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9),
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)]
    graphs, calls = device_compiled.counters["graphs_compiled"], rec.counters["compiled_calls"]
    torch.manual_seed(6)
    steps = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(4)]
    for x, y in steps:
        losses = []
        for m, opt, dev in ((ref, opts[0], "cpu"), (compiled, opts[1], "hypatia")):
            loss = torch.nn.functional.cross_entropy(m(x.to(dev)), y.to(dev))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for p, q in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(q.detach().cpu(), p.detach())
    assert device_compiled.counters["graphs_compiled"] == graphs + 1
    assert rec.counters["compiled_calls"] - calls == 2 * len(steps)  # a forward and a backward per step
