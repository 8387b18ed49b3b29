"""``transformers``' eager attention, as each model spells it, becomes one SDPA call per layer.

Tiny configurations with random weights (never downloaded), two layers, CPU: the attention
rule fires once per layer, outputs (and in training, gradients) match eager, nothing falls back.
The spellings: Llama, Mistral and Qwen2 scale by mul, add the mask, compute softmax in float32
and cast back, expand K and V (``repeat_kv``, GQA) and apply dropout with p = 0; GPT-2 and BERT
add their masks; T5 has no scale and adds its position bias, then the mask; ViT has no mask.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hypatia.planner.counters import counters

transformers = pytest.importorskip("transformers")

LAYERS = 2
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
             max_position_embeddings=32, attn_implementation="eager")


def _decoder(config_cls, **extra):
    return lambda: transformers.AutoModel.from_config(config_cls(**SMALL, num_key_value_heads=2, **extra))


MODELS = {
    "llama": (_decoder(transformers.LlamaConfig), "attention_add_mask"),
    "mistral": (_decoder(transformers.MistralConfig), "attention_add_mask"),
    "qwen2": (_decoder(transformers.Qwen2Config), "attention_add_mask"),
    "gpt2": (lambda: transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=32, attn_pdrop=0.0, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_implementation="eager")), "attention_add_mask"),
    "bert": (lambda: transformers.BertModel(transformers.BertConfig(
        **SMALL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), add_pooling_layer=False),
        "attention_add_mask"),
    "t5": (lambda: transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS, num_heads=4, dropout_rate=0.0,
        attn_implementation="eager")), "attention_bias_mask"),
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager"),
        add_pooling_layer=False), "attention"),
}


def _inputs(name: str, dtype: torch.dtype = torch.float32) -> dict:
    gen = torch.Generator().manual_seed(1)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen, dtype=dtype)}
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding: with a causal mask, the padded queries see nothing at all
    return {"input_ids": torch.randint(0, 64, (2, 12), generator=gen), "attention_mask": mask}


def _build(name: str, training: bool, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = MODELS[name][0]().to(dtype).train(training)
    return model, copy.deepcopy(model)


def _fired(rule: str) -> int:
    return counters[f"rule.{rule}.fired"]


def _no_fallbacks():
    from hypatia.client.backend import session

    s = session().counters
    assert s.get("fallbacks", 0) == 0 and s.get("regions_failed_validation", 0) == 0, dict(s)


@pytest.fixture
def in_process(home, dynamo_reset, monkeypatch):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")


@pytest.mark.parametrize("name", ["mistral", "qwen2", "t5", "vit"])
def test_inference_attention_is_one_sdpa_per_layer(in_process, name):
    model, reference = _build(name, training=False)
    rule, before = MODELS[name][1], _fired(MODELS[name][1])
    inputs = _inputs(name)
    with torch.no_grad():
        out = torch.compile(model, backend="hypatia")(**inputs).last_hidden_state
        torch.testing.assert_close(out, reference(**inputs).last_hidden_state)
    assert _fired(rule) == before + LAYERS
    _no_fallbacks()


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_training_attention_is_one_sdpa_per_layer_and_gradients_match(in_process, name):
    model, reference = _build(name, training=True)
    rule, before = MODELS[name][1], _fired(MODELS[name][1])
    inputs = _inputs(name)
    out = torch.compile(model, backend="hypatia")(**inputs).last_hidden_state
    expected = reference(**inputs).last_hidden_state
    torch.testing.assert_close(out, expected)
    assert _fired(rule) == before + LAYERS
    out.square().mean().backward()
    expected.square().mean().backward()
    for (param, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=param)
    _no_fallbacks()


def test_bfloat16_softmax_in_float32_then_cast_back_is_sdpa(in_process):
    """Llama in bfloat16 computes softmax in float32 and casts back; SDPA accumulates in float32."""
    model, reference = _build("llama", training=False, dtype=torch.bfloat16)
    before, cast = _fired("attention_add_mask"), counters["rewrite.probs.float32_softmax.to_copy3.matched"]
    inputs = _inputs("llama")
    with torch.no_grad():
        out = torch.compile(model, backend="hypatia")(**inputs).last_hidden_state
        torch.testing.assert_close(out, reference(**inputs).last_hidden_state, atol=3e-2, rtol=3e-2)
    assert _fired("attention_add_mask") == before + LAYERS
    assert counters["rewrite.probs.float32_softmax.to_copy3.matched"] >= cast + LAYERS
    _no_fallbacks()


def test_attention_dropout_that_draws_is_not_fused(in_process):
    """BERT's default attention dropout (p = 0.1) in training: eager's random stream, kept."""
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**SMALL, hidden_dropout_prob=0.0), add_pooling_layer=False)
    before = {r: _fired(r) for r in ("attention", "attention_add_mask")}
    out = torch.compile(model.train(), backend="hypatia")(**_inputs("bert")).last_hidden_state
    out.sum().backward()
    assert {r: _fired(r) for r in before} == before
    assert all(p.grad is not None for p in model.encoder.parameters())
    _no_fallbacks()


def test_cuda_half_to_float_softmax_then_cast_back_is_matched():
    """CUDA runs softmax(x, dtype=float32) of a float16 x as ``_softmax(x, half_to_float=True)``,
    which has no CPU kernel: planned here on fake tensors, run by the GPU tests."""
    from graphs import aten_graph
    from hypatia.client.capture import capture
    from hypatia.planner import plan_graph

    def attention(q, k, v, mask):
        scores = q @ k.transpose(-1, -2) * 0.25 + mask
        return torch.ops.aten._softmax(scores, -1, True).to(torch.float16) @ v

    inputs = [torch.randn(2, 4, 8, 16, dtype=torch.float16) for _ in range(3)] + [torch.randn(2, 1, 1, 8, dtype=torch.float16)]
    before = counters["rewrite.probs.half_to_float_softmax.matched"]
    assert plan_graph(capture(aten_graph(attention, *inputs))[0]).rules_fired == {"attention_add_mask": 1}
    assert counters["rewrite.probs.half_to_float_softmax.matched"] == before + 1
