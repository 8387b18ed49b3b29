"""Models nobody here wrote, on the CPU: a subset of the corpus (:mod:`corpus`) small enough for
CI. Each runs through ``backend="hypatia"`` with strict validation against eager, inference or
one training step, with no fallback, no failed region and its expected rules fired. The whole
corpus, torchvision's models among them, runs on CUDA in ``tests/test_gpu_corpus.py``.

Also here: why 16-bit results are compared with float32 rather than with eager alone. A fused
chain computes in float32 and rounds once; eager rounds after every op. Measured on the
backward chain of a MobileNetV3 block in bfloat16 (grad * scale + residual through
hardswish's derivative, 8x64x14x14, 20 draws), against float64: eager's elements are not the
correctly rounded value in 27% of places (max abs error 3.1e-4, mean 1.0e-5), the fused
chain's in 0.02% (max 1.7e-4, mean 7.3e-6). Summed into a bias gradient, both are about 10%
off float64 relative to the (cancelling) sum, and 18% (up to 90%) off each other: a 29%
difference from eager is what rounding once looks like there, not an error.
"""

from __future__ import annotations

import pytest
import torch

import corpus
from hypatia.kernels.pointwise import pointwise_cpu
from hypatia.planner import regions

BF16 = torch.bfloat16

# Each case costs seconds (tracing, planning, validating, running twice); together they cover
# rotary decoders (the transposed layout), encoders, GEMM epilogues, RMS norm, conv + batch
# norm folds, the training graphs of each kind, and one model in bfloat16.
CPU_CASES = [
    ("llama", "inference", torch.float32), ("llama", "training", torch.float32), ("llama", "training", BF16),
    ("qwen2", "inference", torch.float32), ("gpt2", "training", torch.float32), ("bert", "inference", torch.float32),
    ("t5", "inference", torch.float32), ("hf_resnet", "inference", torch.float32),
    ("hf_resnet", "training", torch.float32), ("hf_regnet", "inference", torch.float32),
]


@pytest.fixture
def strict(home, dynamo_reset, monkeypatch):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    monkeypatch.setenv("HYPATIA_CHECKSUM_MODE", "strict")  # every fused region checked before it runs
    return home


@pytest.mark.parametrize("name, phase, dtype", CPU_CASES,
                         ids=[f"{n}-{p}-{str(d).removeprefix('torch.')}" for n, p, d in CPU_CASES])
def test_model_matches_eager_with_its_fusions(strict, name, phase, dtype):
    corpus.run(name, phase, "cpu", dtype)


def test_every_expected_rule_names_a_model_and_a_rule_that_exist():
    from hypatia.planner.passes import FAMILIES
    from hypatia.planner.rules.pointwise import RULE

    known = {rule.name for family in FAMILIES for rule in family.rules} | {RULE}
    for (name, phase), rules in corpus.EXPECTED_RULES.items():
        assert name in corpus.MODELS and phase in ("inference", "training"), (name, phase)
        assert rules <= known, (name, sorted(rules - known))


def test_norms_are_randomized_so_a_wrong_fold_cannot_pass():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.LayerNorm(4))
    corpus.randomize_norms(model)
    bn, ln = model[1], model[2]
    for t, fresh in ((bn.running_mean, 0.0), (bn.running_var, 1.0), (bn.weight, 1.0), (bn.bias, 0.0),
                     (ln.weight, 1.0), (ln.bias, 0.0)):
        assert not torch.any(t == fresh), t


# -- 16-bit: a chain rounded once ------------------------------------------------------------

# MobileNetV3's backward: t = grad * scale + residual, then hardswish's derivative
# (0 at or below -3, x / 3 + 0.5 inside, 1 at or above 3, as ATen's hardswish_backward).
HARDSWISH_BACKWARD_CHAIN = {"v": 1, "n_inputs": 4, "ops": [
    ["mul", ["in", 0], ["in", 1]], ["add", ["v", 0], ["in", 2]],
    ["mul", ["in", 3], ["c", 1 / 3]], ["add", ["v", 2], ["c", 0.5]],
    ["lt", ["in", 3], ["c", 3.0]], ["where", ["v", 4], ["v", 3], ["c", 1.0]],
    ["le", ["in", 3], ["c", -3.0]], ["where", ["v", 6], ["c", 0.0], ["v", 5]],
    ["mul", ["v", 1], ["v", 7]]], "out": 8, "dtype": "bfloat16", "shape": [8, 64, 14, 14]}


def _unfused(grad, scale, residual, x):
    return torch.ops.aten.hardswish_backward(grad * scale + residual, x)


def _chain_inputs(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 64, 14, 14, generator=g) * 1e-2).to(BF16), torch.rand(8, 64, 1, 1, generator=g).to(BF16),
            (torch.randn(8, 64, 14, 14, generator=g) * 1e-2).to(BF16), (torch.randn(8, 64, 14, 14, generator=g) * 3).to(BF16)]


def test_a_bf16_chain_rounded_once_is_closer_to_float64_than_eager_and_passes_validation():
    inputs = _chain_inputs(0)
    exact = _unfused(*(t.double() for t in inputs))
    fused, eager = pointwise_cpu(*inputs, HARDSWISH_BACKWARD_CHAIN), _unfused(*inputs)
    rounded = exact.to(BF16)
    fused_err, eager_err = (fused.double() - exact).abs(), (eager.double() - exact).abs()
    assert (fused != rounded).float().mean() < 0.01 < 0.1 < (eager != rounded).float().mean()
    assert fused_err.mean() < eager_err.mean() and fused_err.max() <= eager_err.max()
    assert (fused != eager).float().mean() > 0.1  # so comparing with eager alone cannot be the test
    # validation compares with float64 and allows for the unfused ops' own rounding: rounding once passes
    reference = regions.Reference(_unfused, [inputs, _chain_inputs(1)])
    verdict = regions.check(lambda *xs: pointwise_cpu(*xs, HARDSWISH_BACKWARD_CHAIN), reference)
    assert verdict.ok, verdict.detail
    # and the corpus' comparison takes the fused bias gradient, which a float32 model checks
    bias = [t.float().sum((0, 2, 3)) for t in (fused, eager)]
    corpus.assert_as_accurate("bias gradient", bias[0].to(BF16), bias[1].to(BF16), exact.float().sum((0, 2, 3)))


def test_the_16_bit_comparison_still_catches_a_wrong_result():
    inputs = _chain_inputs(2)
    exact, eager = _unfused(*(t.double() for t in inputs)).float(), _unfused(*inputs)
    wrong = pointwise_cpu(*inputs, HARDSWISH_BACKWARD_CHAIN) * 1.1  # a scale off by 10%
    with pytest.raises(AssertionError, match="max abs error"):
        corpus.assert_as_accurate("output", wrong, eager, exact)
    stale = pointwise_cpu(inputs[0], inputs[1] * 0, inputs[2], inputs[3], HARDSWISH_BACKWARD_CHAIN)  # a lost input
    with pytest.raises(AssertionError, match="max abs error"):
        corpus.assert_as_accurate("output", stale, eager, exact)


def test_the_float32_comparison_catches_a_result_one_percent_off():
    """Against a float64 reference (a float32 training step), a scale off by 1% fails."""
    inputs = [t.float() for t in _chain_inputs(2)]
    exact, eager = _unfused(*(t.double() for t in inputs)), _unfused(*inputs)
    corpus.assert_as_accurate("output", eager.clone(), eager, exact)
    with pytest.raises(AssertionError, match="max abs error"):
        corpus.assert_as_accurate("output", eager * 1.01, eager, exact)
