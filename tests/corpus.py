"""A corpus of models nobody here wrote: ``transformers`` and torchvision constructors with tiny
configs and random weights (never a download), run through ``backend="hypatia"`` and compared
with eager PyTorch, for inference and for one training step.

Batch-norm statistics and every norm's weights are randomized, so a wrong fold or a dropped
scale cannot pass by accident (fresh modules have mean 0, variance 1, weight 1, bias 0).
``tests/test_corpus.py`` runs a CPU subset in CI; ``tests/test_gpu_corpus.py`` runs every model
on CUDA in float32 and bfloat16.

In float32 the compiled model must match eager. In 16-bit dtypes eager is no yardstick on its
own: it rounds after every op, while a fused chain computes in float32 and rounds once (as
Inductor does), which is more accurate but different, and a reduction over many such values
(a bias gradient) can turn one-ulp differences into a large relative difference when its
terms cancel. So 16-bit results are compared with the same model in float32: the compiled
model may be no further from it than eager is, within a margin (:func:`assert_as_accurate`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch

SEED = 0
HALF = (torch.bfloat16, torch.float16)
FP32_TOLERANCE = dict(rtol=1e-4, atol=1e-4)
# A result may be this many times as far from the wider reference as eager's own: measured on an
# H200, the gradients of conv nets with squeeze-excitation and of GPT-2 under Inductor land up to
# 3.2x eager's error, since a fused region sums in another order (a wrong result is off by its
# magnitude and fails by orders of magnitude more)
EAGER_FACTOR = 4.0
MARGIN_ULPS = 2  # plus this many units in the last place at the reference's magnitude
# ... or this share of the reference's magnitude, where eager happens to land closer than its
# dtype's rounding explains (a gradient through batch norm over a few values: measured up to
# 1.5e-4 in float32 on an H200, both sides correct)
RELATIVE_FLOOR = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 2e-2}

# Training steps known to be less accurate than this on CUDA: open defects, kept visible as strict
# expected failures (the test fails the day they pass, so the mark is removed then).
CUDA_TRAINING_GAPS = {
    ("regnet_y_400mf", torch.float32): "the last block's batch-norm bias gradients land 14% from float64 (eager: "
                                       "2e-4); its 32 pointwise_chain regions cause it, in either engine (NVRTC or "
                                       "torch): with them dropped the step matches eager",
    ("regnet_y_400mf", torch.bfloat16): "the loss lands 4x further from float32 than eager's; as in float32",
    ("t5", torch.bfloat16): "gradients land 6-9% from float32 where eager's are within 1% (SDPA's 16-bit backward "
                            "on T5's unscaled scores, where eager takes the softmax in float32)",
}
VOCAB, SEQ, BATCH, IMAGE, TV_IMAGE = 128, 8, 2, 32, 64


@dataclass(frozen=True)
class Model:
    name: str
    source: str  # "transformers" or "torchvision"
    build: Callable[[], torch.nn.Module]  # random weights; the caller seeds
    inputs: Callable[[torch.device, torch.dtype], dict]  # keyword arguments of forward


def _tokens(device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(SEED + 1)
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).to(device)}


def _encoder_decoder_tokens(device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(SEED + 2)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return {"input_ids": ids.to(device), "decoder_input_ids": ids[:, : SEQ // 2].to(device)}


def _images(name: str, size: int) -> Callable[[torch.device, torch.dtype], dict]:
    def inputs(device: torch.device, dtype: torch.dtype) -> dict:
        g = torch.Generator().manual_seed(SEED + 3)
        return {name: torch.randn(BATCH, 3, size, size, generator=g).to(device=device, dtype=dtype)}

    return inputs


def _hf(name: str, config: str, cls: str, inputs: Callable, **settings: Any) -> Model:
    """A ``transformers`` model built from its config: random weights, hand-written ("eager")
    attention where the model has the choice, so that attention is in the graph."""

    def build() -> torch.nn.Module:
        import transformers

        model_cls = getattr(transformers, cls)
        cfg = getattr(transformers, config)(**settings)
        try:
            return model_cls._from_config(cfg, attn_implementation="eager")
        except (TypeError, ValueError):  # no choice of attention
            return model_cls._from_config(cfg)

    return Model(name, "transformers", build, inputs)


def _tv(name: str, constructor: str, **kwargs: Any) -> Model:
    def build() -> torch.nn.Module:
        import torchvision  # the GPU machine only: PyPI's torchvision does not import beside CI's torch

        return getattr(torchvision.models, constructor)(weights=None, num_classes=10, **kwargs)

    return Model(name, "torchvision", build, _images("x", TV_IMAGE))


TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=64)
DECODER = dict(TEXT, num_key_value_heads=2, use_cache=False)
ENCODER = dict(TEXT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
HF_IMAGE = _images("pixel_values", IMAGE)

MODELS: dict[str, Model] = {m.name: m for m in [
    # decoders with rotary embeddings: the query's transposed layout must survive the fused chain
    _hf("llama", "LlamaConfig", "LlamaModel", _tokens, **DECODER),
    _hf("mistral", "MistralConfig", "MistralModel", _tokens, sliding_window=None, **DECODER),
    _hf("qwen2", "Qwen2Config", "Qwen2Model", _tokens, **DECODER),
    _hf("gpt2", "GPT2Config", "GPT2Model", _tokens, vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False),
    _hf("bert", "BertConfig", "BertModel", _tokens, **ENCODER),
    _hf("t5", "T5Config", "T5Model", _encoder_decoder_tokens, vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
        num_layers=1, num_heads=4, dropout_rate=0.0, use_cache=False),
    _hf("vit", "ViTConfig", "ViTModel", HF_IMAGE, image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    # transformers' conv nets: conv + batch norm folds in inference
    _hf("hf_resnet", "ResNetConfig", "ResNetModel", HF_IMAGE, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
        layer_type="basic"),
    _hf("hf_mobilenet_v2", "MobileNetV2Config", "MobileNetV2Model", HF_IMAGE, image_size=IMAGE, depth_multiplier=0.35),
    _hf("hf_convnext", "ConvNextConfig", "ConvNextModel", HF_IMAGE, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1]),
    _hf("hf_regnet", "RegNetConfig", "RegNetModel", HF_IMAGE, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
        groups_width=8),
    _hf("hf_efficientnet", "EfficientNetConfig", "EfficientNetModel", HF_IMAGE, image_size=IMAGE,
        width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320),
    # torchvision (the GPU machine only)
    _tv("resnet18", "resnet18"),
    _tv("mobilenet_v3_small", "mobilenet_v3_small"),
    _tv("mobilenet_v2", "mobilenet_v2"),
    _tv("densenet121", "densenet121"),
    _tv("shufflenet_v2", "shufflenet_v2_x0_5"),
    _tv("regnet_y_400mf", "regnet_y_400mf"),
    _tv("efficientnet_b0", "efficientnet_b0"),
    _tv("mnasnet", "mnasnet0_5"),
    _tv("squeezenet", "squeezenet1_1"),
    _tv("convnext_tiny", "convnext_tiny"),
    _tv("vit_b_16", "vit_b_16", image_size=TV_IMAGE),
]}

# The rules each model must fire, one line per model and phase: adding a rule to a model's
# expected set is one edit of its line. Rules firing beyond these are allowed; "attention" is
# any rule of the attention family.
_ROTARY = frozenset({"rms_norm", "pointwise_chain"})
EXPECTED_RULES: dict[tuple[str, str], frozenset[str]] = {
    ("llama", "inference"): _ROTARY | {"attention"},
    ("llama", "training"): _ROTARY | {"attention"},
    ("mistral", "inference"): _ROTARY | {"attention"},
    ("mistral", "training"): _ROTARY | {"attention"},
    ("qwen2", "inference"): _ROTARY | {"attention"},
    ("qwen2", "training"): _ROTARY | {"attention"},
    ("gpt2", "inference"): frozenset({"attention", "mlp_gelu_tanh"}),
    ("gpt2", "training"): frozenset({"attention", "mlp_gelu_tanh"}),
    ("bert", "inference"): frozenset({"attention", "mlp_gelu", "pointwise_chain"}),
    ("bert", "training"): frozenset({"attention", "mlp_gelu", "pointwise_chain"}),
    ("t5", "inference"): frozenset({"attention", "rms_norm", "pointwise_chain"}),
    ("t5", "training"): frozenset({"attention", "rms_norm", "pointwise_chain"}),
    ("vit", "inference"): frozenset({"attention", "mlp_gelu"}),
    ("vit", "training"): frozenset({"attention", "mlp_gelu"}),
    ("hf_resnet", "inference"): frozenset({"conv_bn_relu", "conv_bn", "pointwise_chain"}),
    ("hf_resnet", "training"): frozenset({"pointwise_chain"}),  # batch norm in training mode does not fold
    ("hf_mobilenet_v2", "inference"): frozenset({"conv_bn"}),
    ("hf_convnext", "inference"): frozenset({"pointwise_chain"}),
    ("hf_convnext", "training"): frozenset({"pointwise_chain"}),
    ("hf_regnet", "inference"): frozenset({"conv_bn_relu", "conv_bn", "pointwise_chain"}),
    ("hf_regnet", "training"): frozenset({"pointwise_chain"}),
    ("hf_efficientnet", "inference"): frozenset({"conv_bn", "pointwise_chain"}),
    ("hf_efficientnet", "training"): frozenset({"pointwise_chain"}),
    ("resnet18", "inference"): frozenset({"conv_bn_relu", "conv_bn"}),
    ("mobilenet_v3_small", "inference"): frozenset({"conv_bn"}),
    ("mobilenet_v2", "inference"): frozenset({"conv_bn"}),
    ("densenet121", "inference"): frozenset({"conv_bn_relu"}),
    ("shufflenet_v2", "inference"): frozenset({"conv_bn_relu", "conv_bn"}),
    ("regnet_y_400mf", "inference"): frozenset({"conv_bn_relu", "conv_bn"}),
    ("efficientnet_b0", "inference"): frozenset({"conv_bn"}),
    ("mnasnet", "inference"): frozenset({"conv_bn_relu", "conv_bn"}),
}


# Known gaps, (model, rule) pairs expected in float32 only: T5's RMS norm computes its variance
# in float32 between casts, which the rms_norm patterns do not match in 16-bit models.
FLOAT32_ONLY = {("t5", "rms_norm")}


def expected_rules(name: str, phase: str, dtype: torch.dtype = torch.float32) -> frozenset[str]:
    rules = EXPECTED_RULES.get((name, phase), frozenset())
    if dtype in HALF:
        rules = frozenset(r for r in rules if (name, r) not in FLOAT32_ONLY)
    return rules


def randomize_norms(model: torch.nn.Module, seed: int = SEED) -> None:
    """Batch-norm running statistics and every norm's weight and bias, drawn away from their
    fresh values (mean 0, variance 1, weight 1, bias 0)."""
    g = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float32) * (high - low) + low)

    with torch.no_grad():
        for module in model.modules():
            if "norm" not in type(module).__name__.lower():
                continue
            if getattr(module, "running_mean", None) is not None:
                draw(module.running_mean, -0.5, 0.5)
                draw(module.running_var, 0.5, 2.0)
            if isinstance(getattr(module, "weight", None), torch.Tensor):
                draw(module.weight, 0.5, 1.5)
            if isinstance(getattr(module, "bias", None), torch.Tensor):
                draw(module.bias, -0.2, 0.2)


def draw_nothing(model: torch.nn.Module) -> None:
    """A training step is compared with eager's, so nothing in it may draw random numbers:
    dropout and torchvision's stochastic depth get p = 0 (a dropout that draws is never fused:
    its random stream could not match eager's; ``tests/test_attention_models.py`` checks that)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) or type(module).__name__ == "StochasticDepth":
            module.p = 0.0


def build(name: str, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """Model ``name`` with seeded random weights and randomized norms, on ``device`` in ``dtype``."""
    torch.manual_seed(SEED)
    model = MODELS[name].build()
    randomize_norms(model)
    draw_nothing(model)
    return model.to(device=device, dtype=dtype)


def first_output(out: Any) -> torch.Tensor:
    """The model's main output: a torchvision model's tensor, a ``transformers`` output's first
    field (``last_hidden_state``)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.to_tuple() if hasattr(out, "to_tuple") else tuple(out)
    return next(v for v in values if isinstance(v, torch.Tensor))


# -- the comparison --------------------------------------------------------------------------


def assert_as_accurate(what: str, actual: torch.Tensor, eager: torch.Tensor, reference: torch.Tensor) -> None:
    """``actual`` is no further from the wider ``reference`` than ``eager`` (the
    unfused ops in the same dtype) is, times EAGER_FACTOR (or RELATIVE_FLOOR of its magnitude), plus MARGIN_ULPS of the dtype at the
    reference's magnitude. A wrong result (a missing scale, a stale fold) is off by the
    magnitude itself and fails."""
    ref = reference.detach().double()
    err = (actual.detach().double() - ref).abs().max().item()
    own = (eager.detach().double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    bound = max(EAGER_FACTOR * own, RELATIVE_FLOOR[actual.dtype] * scale) + MARGIN_ULPS * torch.finfo(actual.dtype).eps * scale
    assert err <= bound, (f"{what}: max abs error {err:.3g} against {reference.dtype}, eager's in {actual.dtype} is "
                          f"{own:.3g} (bound {bound:.3g}, magnitude {scale:.3g})")


def _compare(what: str, actual: torch.Tensor, eager: torch.Tensor, reference: torch.Tensor | None) -> None:
    assert actual.shape == eager.shape and actual.dtype == eager.dtype, what
    if reference is None:
        torch.testing.assert_close(actual, eager, **FP32_TOLERANCE, msg=lambda m: f"{what}: {m}")
    else:
        assert_as_accurate(what, actual, eager, reference)


def _widened(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def run(name: str, phase: str, device: str, dtype: torch.dtype) -> dict[str, int]:
    """Model ``name`` through ``backend="hypatia"`` against eager, for inference or one training
    step (the output, the loss and every parameter's gradient); no graph may fall back to
    eager and no fused region may fail validation. Returns the rules the session's plans
    fired, having checked that they include the expected ones."""
    from hypatia.client.backend import session

    model = build(name, device, dtype)
    eager = copy.deepcopy(model)
    # 16-bit results are judged against the model in float32; a float32 training step against
    # the model in float64, since a gradient through batch norm over a few values amplifies the
    # rounding of any two correct orders of summation past a fixed tolerance
    wide = torch.float32 if dtype in HALF else torch.float64 if phase == "training" else None
    reference = copy.deepcopy(model).to(wide) if wide is not None else None
    for m in (model, eager, reference):
        if m is not None:
            m.train(phase == "training")
    inputs = MODELS[name].inputs(torch.device(device), dtype)
    compiled = torch.compile(model, backend="hypatia")
    runs = [(compiled, inputs), (eager, inputs)] + ([(reference, _widened(inputs, wide))] if reference is not None else [])
    with torch.set_grad_enabled(phase == "training"):
        outputs = [first_output(m(**x)) for m, x in runs]
    ref_output = outputs[2] if reference is not None else None
    _compare(f"{name} {phase} output", outputs[0], outputs[1], ref_output)
    if phase == "training":
        losses = [o.float().square().mean() for o in outputs]
        for loss in losses:
            loss.backward()
        _compare(f"{name} loss", losses[0], losses[1], losses[2] if reference is not None else None)
        params = [list(model.named_parameters()), list(eager.parameters())]
        params.append(list(reference.parameters()) if reference is not None else [None] * len(params[1]))
        for (pname, p), q, r in zip(*params):
            assert (p.grad is None) == (q.grad is None), f"{name}: {pname} has a gradient on one side only"
            if q.grad is not None:
                _compare(f"{name} grad of {pname}", p.grad, q.grad, r.grad if r is not None else None)
    counters = session().counters
    assert counters["fallbacks"] == 0, f"{name} {phase}: {counters['fallbacks']} graph(s) fell back to eager"
    assert counters["regions_failed_validation"] == 0, f"{name} {phase}: fused regions failed validation"
    fired: dict[str, int] = {}
    for _, plan in session().plans:
        for rule, n in plan.rules_fired.items():
            fired[rule] = fired.get(rule, 0) + n
    # "attention" stands for the family: which spelling a model's attention takes varies with
    # its transformers release (tests/test_attention_models.py pins each spelling's rule)
    missing = expected_rules(name, phase, dtype) - set(fired) - ({"attention"} if any(
        r.startswith("attention") for r in fired) else set())
    assert not missing, f"{name} {phase}: expected rules {sorted(missing)} did not fire (fired: {fired})"
    return fired
