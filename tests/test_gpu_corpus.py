"""The whole corpus (:mod:`corpus`) on CUDA: every model, ``transformers``' and torchvision's, in
float32 and bfloat16, for inference and one training step, against eager (float32) or against
the same model in float32 with eager's own 16-bit error as the allowance (bfloat16). No graph
may fall back, no region fail validation, and each model's expected rules must fire.

Run on the GPU machine with ``pytest -m gpu tests/test_gpu_corpus.py`` (torchvision and
transformers installed; nothing is downloaded).
"""

from __future__ import annotations

import pytest
import torch

import corpus

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]  # the largest models trace for minutes

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def on_cuda(home, dynamo_reset, monkeypatch):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    monkeypatch.setenv("HYPATIA_CHECKSUM_MODE", "strict")
    # float32 means float32: TF32 would round a folded convolution's weights differently from
    # eager's unfolded ones, by more than the comparison allows
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    return home


CASES = [pytest.param(name, phase, dtype, id=f"{name}-{phase}-{dname}",
                      marks=[pytest.mark.xfail(strict=True, reason=corpus.CUDA_TRAINING_GAPS[name, dtype])]
                      if phase == "training" and (name, dtype) in corpus.CUDA_TRAINING_GAPS else [])
         for name in sorted(corpus.MODELS) for phase in ("inference", "training")
         for dtype, dname in zip(DTYPES, ("fp32", "bf16"))]


@pytest.mark.parametrize("name, phase, dtype", CASES)
def test_model_matches_eager_with_its_fusions_on_cuda(on_cuda, name, phase, dtype):
    corpus.run(name, phase, "cuda", dtype)


# Hypatia's rewrites in front of Inductor's code generator, on a decoder and a conv net
INDUCTOR_CASES = [("llama", "inference"), ("llama", "training"), ("resnet18", "inference"), ("gpt2", "training")]


@pytest.mark.parametrize("name, phase", INDUCTOR_CASES, ids=[f"{n}-{p}" for n, p in INDUCTOR_CASES])
def test_model_matches_eager_under_the_inductor_executor(on_cuda, monkeypatch, name, phase):
    monkeypatch.setenv("HYPATIA_EXECUTOR", "inductor")
    corpus.run(name, phase, "cuda", torch.bfloat16)
    from hypatia.client.backend import session

    assert session().counters["executor.inductor"] >= 1
