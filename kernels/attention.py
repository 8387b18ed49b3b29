"""Attention written out by hand -> ``scaled_dot_product_attention``.

The region's inputs are the query, the key *as transposed for the matmul* and the value (and
the masks); SDPA takes the key untransposed, which is a free view.

Masks that *replace* scores (``masked_fill``, ``where``) become additive masks of the fill.
That is eager's answer wherever a row keeps a position; on a row where every position is
masked eager gives the mean of V (softmax of equal values), and SDPA gives it too only when
the fill absorbs any score in float32 (``finfo.min`` of float32 or bfloat16). For any other
finite fill such rows are set to the mean of V explicitly. A fill of -inf makes eager's answer
NaN there: SDPA's own is kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ABSORBING = -1e30  # as in hypatia.planner.rules.attention


def attention(q, kt, v, scale):
    return F.scaled_dot_product_attention(q, kt.transpose(-2, -1), v, scale=scale)


def _fully_masked_rows(out, v, hidden):
    """``out`` with every row whose positions are all ``hidden`` set to the mean of V."""
    return torch.where(hidden.all(-1, keepdim=True), v.mean(-2, keepdim=True), out)


def _replacing(q, kt, v, hidden, fill, scale):
    """softmax(scores with ``hidden`` positions replaced by the constant ``fill``) @ v."""
    if fill == -math.inf:
        return F.scaled_dot_product_attention(q, kt.transpose(-2, -1), v, attn_mask=~hidden, scale=scale)
    attn_mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(hidden, fill)
    out = F.scaled_dot_product_attention(q, kt.transpose(-2, -1), v, attn_mask=attn_mask, scale=scale)
    # eager's equal scores give a fully hidden row the mean of V; SDPA's fused CUDA kernels
    # give it zeros even for an absorbing fill, so the row is set explicitly
    return _fully_masked_rows(out, v, hidden)


def attention_masked(q, kt, v, mask, scale, mask_kind, fill):
    """``add``: scores + mask; ``fill``: masked_fill(mask, fill) (True hides); ``keep``:
    where(mask, scores, fill) (True keeps)."""
    if mask_kind == "add":
        return F.scaled_dot_product_attention(q, kt.transpose(-2, -1), v, attn_mask=mask, scale=scale)
    if mask_kind == "fill":
        return _replacing(q, kt, v, mask, fill, scale)
    if mask_kind == "keep":
        return _replacing(q, kt, v, ~mask, fill, scale)
    raise ValueError(f"unknown mask kind {mask_kind!r}")


def attention_where(q, kt, v, keep, fill, scale):
    """where(keep, scores, fill) with ``fill`` a 0-d tensor the planner cannot read: an additive
    mask, and rows with nothing kept set to the mean of V as eager's equal scores give."""
    attn_mask = torch.where(keep, torch.zeros((), dtype=q.dtype, device=q.device), fill.to(q.dtype))
    out = F.scaled_dot_product_attention(q, kt.transpose(-2, -1), v, attn_mask=attn_mask, scale=scale)
    return _fully_masked_rows(out, v, ~keep)


def attention_bias_mask(q, kt, v, bias, mask, scale):
    """scores + bias + mask (T5's position bias, then the padding mask) as one additive mask."""
    return F.scaled_dot_product_attention(q, kt.transpose(-2, -1), v, attn_mask=bias + mask, scale=scale)


def attention_keep_add(q, kt, v, keep, mask, scale, fill):
    """where(keep, scores, fill) + mask (GPT-2's causal mask, then the padding mask), ``fill``
    absorbing: one additive mask."""
    attn_mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~keep, fill) + mask
    return F.scaled_dot_product_attention(q, kt.transpose(-2, -1), v, attn_mask=attn_mask, scale=scale)
