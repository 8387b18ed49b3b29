"""One micro-model per fusion family, timed under eager PyTorch, Inductor and Hypatia side by side
in one process (the runtime section's measurement), with the Hypatia rules each one fired.

Every micro-model is the pattern one rule is written for, at a realistic size on the GPU; the
CPU divides the leading dimension so one call takes a few milliseconds on a small machine.
Inference only (``torch.no_grad()``, eval mode). A rule counts as fired when the planner chose
its region, whether it planned in the daemon (read from its stats) or in this process.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from benchmarks.runtime import DTYPES, add_speedups, cast_inputs, error_text, float64_reference, measure_backend, timing_args

# The families are judged as the static plan fuses them, under the default executor (tuning and
# the executor choice are the runtime section's job).
FAMILY_BACKENDS = ("eager", "inductor", "hypatia")
FAMILY_SETTINGS = {"hypatia": "hypatia_static"}  # the runtime section's backend each row measures


class LayerNormManual(nn.Module):
    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.w, self.b, self.eps = nn.Parameter(1 + 0.1 * torch.randn(width)), nn.Parameter(0.1 * torch.randn(width)), eps

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.w + self.b


class RMSNormManual(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.w, self.eps = nn.Parameter(1 + 0.1 * torch.randn(width)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w


class SoftmaxManual(nn.Module):
    def forward(self, x):
        e = torch.exp(x - x.amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True)


class AttentionCore(nn.Module):
    """``softmax(q @ k^T / sqrt(d) + mask) @ v``, or with ``masked_fill(mask, -inf)`` for a boolean mask."""

    def forward(self, q, k, v, mask):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return torch.softmax(scores, dim=-1) @ v


class PointwiseChain(nn.Module):
    def forward(self, x, y):
        return torch.sigmoid(x * 1.702) * x + y * 0.5 - torch.tanh(y)


@dataclass(frozen=True)
class Micro:
    name: str
    rule: str  # the Hypatia rule written for this pattern
    build: Callable[[], nn.Module]
    # (leading dimension, device, dtype) -> model inputs
    make_inputs: Callable[[int, torch.device, torch.dtype], tuple]
    batch: int  # leading dimension on the GPU
    cpu_batch: int  # on the CPU: one eager call in about 1-20 ms on two cores
    description: str = ""

    def batch_for(self, device: str) -> int:
        return self.batch if device == "cuda" else self.cpu_batch


def _randn(*shape):
    return lambda b, dev, dt: (torch.randn(b, *shape, device=dev, dtype=dt),)


def _attention_inputs(heads: int, seq: int, head_dim: int, causal: bool):
    def make(b, dev, dt):
        q, k, v = (torch.randn(b, heads, seq, head_dim, device=dev, dtype=dt) for _ in range(3))
        if causal:
            mask = torch.ones(seq, seq, dtype=torch.bool, device=dev).triu(1)
        else:  # padding-style: the last eighth of the keys masked out
            mask = torch.zeros(b, 1, 1, seq, device=dev, dtype=dt)
            mask[..., seq - seq // 8:] = -1e4
        return q, k, v, mask
    return make


MICROS: tuple[Micro, ...] = (
    Micro("linear_silu", "linear_silu", lambda: nn.Sequential(nn.Linear(1024, 4096), nn.SiLU()), _randn(1024),
          8 * 512, 128, "Linear(1024, 4096) + SiLU; GPU 4096 tokens, CPU 128"),
    Micro("mlp_gelu", "mlp_gelu", lambda: nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)),
          _randn(1024), 8 * 512, 64, "Linear(1024, 4096) -> GELU -> Linear(4096, 1024); GPU 4096 tokens, CPU 64"),
    Micro("attention_mask", "attention_add_mask", AttentionCore, _attention_inputs(16, 512, 64, causal=False), 8, 1,
          "softmax(q k^T / sqrt(d) + mask) v, q/k/v [b, 16, 512, 64], additive mask [b, 1, 1, 512]"),
    Micro("attention_causal_fill", "attention_fill_mask", AttentionCore, _attention_inputs(16, 512, 64, causal=True), 8, 1,
          "the same with masked_fill(causal bool mask, -inf)"),
    Micro("layer_norm_manual", "layer_norm", lambda: LayerNormManual(1024), _randn(512, 1024), 8, 2,
          "(x - mean) / sqrt(var + eps) * w + b written out, x [b, 512, 1024]"),
    Micro("rms_norm_manual", "rms_norm", lambda: RMSNormManual(1024), _randn(512, 1024), 8, 2,
          "x * rsqrt(mean(x^2) + eps) * w written out, x [b, 512, 1024]"),
    Micro("softmax_manual", "softmax", SoftmaxManual, _randn(16, 512, 512), 8, 1,
          "exp(x - amax(x)) / sum, x [b, 16, 512, 512]"),
    Micro("conv_bn_relu", "conv_bn_relu",
          lambda: nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()),
          _randn(64, 56, 56), 32, 2, "Conv2d(64, 64, 3) + BatchNorm2d + ReLU in eval mode, x [b, 64, 56, 56]"),
    Micro("pointwise_chain", "pointwise_chain", PointwiseChain,
          lambda b, dev, dt: (torch.randn(b, 512, 1024, device=dev, dtype=dt), torch.randn(b, 512, 1024, device=dev, dtype=dt)),
          8, 2, "sigmoid(x * 1.702) * x + y * 0.5 - tanh(y), x and y [b, 512, 1024]"),
)


def _randomize_batch_norm(model: nn.Module) -> None:
    """Running statistics away from (0, 1), so that folding them is visible in the numbers."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)


def rules_fired_total() -> Counter:
    """``rule.<name>.fired`` counts of the planner, here and in the daemon (where it planned)."""
    from hypatia.config import load
    from hypatia.daemon.control import stats
    from hypatia.planner.counters import counters

    total = Counter({k[len("rule."):-len(".fired")]: v for k, v in counters.items()
                     if k.startswith("rule.") and k.endswith(".fired")})
    daemon_rules = stats(load()).get("rules", {})
    total.update({k[:-len(".fired")]: v for k, v in daemon_rules.items() if k.endswith(".fired")})
    return total


def _delta(after: Counter, before: Counter) -> dict[str, int]:
    return {k: after[k] - before[k] for k in sorted(after) if after[k] != before[k]}


def run_case(m: Micro, device: str, dtype_name: str, quick: bool) -> list[dict[str, Any]]:
    """Eager, Inductor and Hypatia for one (micro-model, dtype); the Hypatia row also says which
    rules fired and what its session (a fresh one per compile) counted (regions fused, failed
    validation, plan source)."""
    torch.manual_seed(0)
    base = m.build().to(device).eval()
    with torch.no_grad():
        _randomize_batch_norm(base)
    batch = m.batch_for(device)
    inputs64 = m.make_inputs(batch, torch.device(device), torch.float64)
    reference = float64_reference(base, inputs64)
    inputs = cast_inputs(inputs64, DTYPES[dtype_name])
    rows = []
    for backend in FAMILY_BACKENDS:
        row: dict[str, Any] = {"family": m.name, "rule": m.rule, "dtype": dtype_name, "backend": backend, "batch": batch}
        before = None
        try:
            if backend == "hypatia":
                before = rules_fired_total()
            row.update(measure_backend(base, FAMILY_SETTINGS.get(backend, backend), DTYPES[dtype_name], inputs,
                                       reference, "inference", device, timing_args(device, quick)))
        except Exception as exc:  # one failing backend must not hide the others' numbers
            row["error"] = error_text(exc)
        if before is not None:
            try:
                row["rules_fired"] = _delta(rules_fired_total(), before)
            except Exception as exc:  # counters are a report, never a reason to lose the timing
                row["error"] = row.get("error") or f"reading counters: {error_text(exc)}"
        rows.append(row)
    add_speedups(rows)
    by = {r["backend"]: r for r in rows}
    if "median_ms" in by["inductor"] and "median_ms" in by["hypatia"]:
        by["hypatia"]["speedup_vs_inductor"] = round(by["inductor"]["median_ms"] / by["hypatia"]["median_ms"], 4)
    return rows


def run(device: str, quick: bool, budget_s: float, dtypes: list[str] | None = None) -> dict:
    """Every (micro-model, dtype) on ``device``; cases past ``budget_s`` are recorded as skipped."""
    start = time.monotonic()
    dtypes = [d for d in DTYPES if d in (dtypes or (["float32"] if quick else list(DTYPES)))]
    rows: list[dict] = []
    for dtype_name in dtypes:
        for m in MICROS:
            if time.monotonic() - start > budget_s:
                rows.append({"family": m.name, "rule": m.rule, "dtype": dtype_name, "skipped": "time budget"})
                continue
            rows.extend(run_case(m, device, dtype_name, quick))
    return {"rows": rows, "notes": []}
