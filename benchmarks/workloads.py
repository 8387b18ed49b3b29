"""The benchmark workloads (dropout off in the transformers models, so steps are deterministic): name, model builder, inputs and loss, at full and reduced sizes.

Full sizes are the issue's (GPU); the CPU keeps the shapes of every layer but divides the batch
(``cpu_batch_divisor``), and ``--quick`` uses a tiny version of the small MLP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, act: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d_in, d_hidden), act, nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention written out by hand, as many model files do."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class TransformerBlock(nn.Module):
    def __init__(self, width: int = 768, heads: int = 12):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.ln2, self.mlp = nn.LayerNorm(width), MLP(width, 4 * width, width, nn.GELU())

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ConvNet(nn.Module):
    def __init__(self, channels: int = 64, layers: int = 4):
        super().__init__()
        self.body = nn.Sequential(
            *[
                nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
                for _ in range(layers)
            ]
        )

    def forward(self, x):
        return self.body(x)


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable[[], nn.Module]
    # (batch, device, dtype) -> model inputs
    make_inputs: Callable[[int, torch.device, torch.dtype], tuple]
    batch: int
    cpu_batch_divisor: int = 8
    eval_mode: bool = False
    integer_inputs: bool = False
    gpu_only: bool = False
    requires: str | None = None  # an optional package the workload needs
    description: str = ""

    def batch_for(self, device: str, quick: bool = False) -> int:
        if quick:
            return max(1, self.batch // 4)
        return self.batch if device == "cuda" else max(1, self.batch // self.cpu_batch_divisor)


def _randn(*shape):
    return lambda b, dev, dt: (torch.randn(b, *shape, device=dev, dtype=dt),)


def _tokens(seq: int, vocab: int):
    return lambda b, dev, dt: (torch.randint(0, vocab, (b, seq), device=dev),)


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(
        BertConfig(attn_implementation="eager", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        add_pooling_layer=False,
    )


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _resnet50():
    import torchvision

    return torchvision.models.resnet50()


WORKLOADS: tuple[Workload, ...] = (
    Workload("mlp_large", lambda: MLP(1024, 4096, 1024, nn.GELU()), _randn(1024), 4096,
             description="batch 4096, 1024 -> 4096 -> 1024, GELU"),
    Workload("mlp_small", lambda: MLP(512, 512, 512, nn.ReLU()), _randn(512), 256, cpu_batch_divisor=1,
             description="batch 256, 512 -> 512 -> 512, ReLU"),
    Workload("transformer_block", TransformerBlock, _randn(1024, 768), 8, cpu_batch_divisor=8,
             description="batch 8 x 1024 tokens, width 768, 12 heads, hand-written attention"),
    Workload("convnet", ConvNet, _randn(64, 56, 56), 32, eval_mode=True,
             description="4 x (conv3x3 + BatchNorm + ReLU), 32x64x56x56, eval mode"),
    Workload("bert_base", _bert, _tokens(512, 30522), 8, cpu_batch_divisor=8, integer_inputs=True,
             requires="transformers", description="transformers BertModel(BertConfig()), random weights, 8 x 512 tokens"),
    Workload("gpt2_small", _gpt2, _tokens(512, 50257), 8, cpu_batch_divisor=8, integer_inputs=True,
             requires="transformers", description="transformers GPT2LMHeadModel(GPT2Config()), random weights, 8 x 512 tokens"),
    Workload("resnet50", _resnet50, _randn(3, 224, 224), 32, gpu_only=True, requires="torchvision",
             description="torchvision resnet50, 32x3x224x224"),
)

QUICK_WORKLOADS = ("mlp_small",)


def by_name(name: str) -> Workload:
    for w in WORKLOADS:
        if w.name == name:
            return w
    raise KeyError(f"unknown workload {name!r}; known: {', '.join(w.name for w in WORKLOADS)}")


def primary_output(out) -> torch.Tensor:
    """The tensor a workload's loss and accuracy are computed on (model outputs vary in type)."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    if isinstance(out, (tuple, list)):
        return primary_output(out[0])
    raise TypeError(f"cannot find the output tensor in {type(out).__name__}")


def loss_of(out) -> torch.Tensor:
    return primary_output(out).float().square().mean()
