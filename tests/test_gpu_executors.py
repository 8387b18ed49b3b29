"""Executors on the GPU (``pytest -m gpu``): CUDA-graphed training steps with an optimizer match
eager, every executor with Hypatia's rewrites matches eager on real models, and the measured
choice runs to the end on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from hypatia.client.choice import TIMED_CALLS, WARMUP_CALLS

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.float32: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}
CAPTURED = ["inductor+cudagraphs", "aten+cudagraphs", "eager+cudagraphs"]


class Block(torch.nn.Module):
    """A hand-written attention block: Hypatia rewrites its attention to SDPA and its MLP."""

    def __init__(self, width=256, heads=4):
        super().__init__()
        self.heads = heads
        self.ln = torch.nn.LayerNorm(width)
        self.qkv, self.proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.fc1, self.fc2 = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) / (c // self.heads) ** 0.5).softmax(-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _train(model, x, steps, compiled=None):
    """``steps`` SGD steps; the outputs and losses of each."""
    fn = model if compiled is None else compiled
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    outs = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        out = fn(x)
        loss = out.float().square().mean()
        loss.backward()
        opt.step()
        outs.append(out.detach().clone())
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("executor", CAPTURED)
def test_cuda_graphed_training_steps_with_an_optimizer_match_eager(home, dynamo_reset, monkeypatch, executor, dtype):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    monkeypatch.setenv("HYPATIA_EXECUTOR", executor)
    torch.manual_seed(0)
    model = Block().to("cuda", dtype)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 128, 256, device="cuda", dtype=dtype)
    got = _train(model, x, 6, torch.compile(model, backend="hypatia"))
    expected = _train(reference, x, 6)
    for a, b in zip(got, expected):  # the optimizer's updates are seen by every later replay
        torch.testing.assert_close(a, b, **TOLERANCE[dtype])
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, **TOLERANCE[dtype])
    from hypatia.client.backend import session

    counters = session().counters
    assert counters[f"executor.{executor}"] == 1 and counters["fallbacks"] == 0, dict(counters)
    assert counters["regions_fused"] >= 2 and not any(k.startswith("cudagraphs_refused") for k in counters), dict(counters)


def test_cuda_graphs_are_refused_for_a_graph_that_writes_its_inputs(home, dynamo_reset, monkeypatch):
    """Batch norm in training writes its running statistics: captured, the writes would be
    frozen into the graph. Not captured, counted, and still correct."""
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    monkeypatch.setenv("HYPATIA_EXECUTOR", "aten+cudagraphs")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).cuda()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16, device="cuda")
    for a, b in zip(_train(model, x, 3, torch.compile(model, backend="hypatia")), _train(reference, x, 3)):
        torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    from hypatia.client.backend import session

    assert session().counters["cudagraphs_refused.input_mutation"] == 1


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0)), lambda: torch.randint(0, 50257, (4, 256), device="cuda")


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(num_hidden_layers=2, attn_implementation="eager", hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0), add_pooling_layer=False), \
        lambda: torch.randint(0, 30522, (4, 256), device="cuda")


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("executor", ["inductor", "inductor+cudagraphs", "aten"])
@pytest.mark.parametrize("build", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_executors_with_rewrites_match_eager_on_real_models(home, dynamo_reset, monkeypatch, build, executor, mode):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    monkeypatch.setenv("HYPATIA_EXECUTOR", executor)
    torch.manual_seed(0)
    model, tokens = build()
    model = model.cuda().train(mode == "training")
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="hypatia")
    x = tokens()
    for _ in range(3):
        if mode == "inference":
            with torch.no_grad():
                torch.testing.assert_close(_output(compiled(x)), _output(reference(x)), **TOLERANCE[torch.float32])
        else:
            for m in (model, reference):
                m.zero_grad(set_to_none=True)
            out, expected = _output(compiled(x)), _output(reference(x))
            torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])
            out.float().square().mean().backward()
            expected.float().square().mean().backward()
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                if q.grad is not None:
                    torch.testing.assert_close(p.grad, q.grad, **TOLERANCE[torch.float32], msg=name)
    from hypatia.client.backend import session

    counters = session().counters
    rules = {rule for _, plan in session().plans for rule in plan.rules_fired}
    assert counters["fallbacks"] == 0 and counters["regions_fused"] >= 2, dict(counters)
    assert any(r.startswith("attention") for r in rules), rules  # hand-written attention became SDPA


def test_the_measured_choice_runs_to_the_end_on_the_gpu(home, dynamo_reset, monkeypatch):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    monkeypatch.setenv("HYPATIA_EXECUTOR", "auto")
    torch.manual_seed(0)
    model = Block().cuda()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 128, 256, device="cuda")
    steps = 6 * (WARMUP_CALLS + TIMED_CALLS) + 3
    for a, b in zip(_train(model, x, steps, torch.compile(model, backend="hypatia")), _train(reference, x, steps)):
        torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])
    from hypatia.client.backend import session

    (choice,) = session().choices
    assert set(choice) - {"chosen"} == {"inductor", "inductor+cudagraphs", "aten", "aten+cudagraphs", "eager",
                                        "eager+cudagraphs"}, choice
    timed = {n: c["median_us"] for n, c in choice.items() if n != "chosen" and not c["error"]}
    assert choice["chosen"] == min(timed, key=timed.get) and all(c["with_backward"] for n, c in choice.items()
                                                                 if n in timed), choice
