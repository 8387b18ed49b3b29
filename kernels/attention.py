"""Attention written out by hand -> ``scaled_dot_product_attention``.

The region's inputs are the query, the key *as transposed for the matmul* and the value (and
the mask); SDPA takes the key untransposed, which is a free view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q, kt, v, scale):
    return F.scaled_dot_product_attention(q, kt.transpose(-2, -1), v, scale=scale)


def attention_masked(q, kt, v, mask, scale, mask_kind, fill):
    if mask_kind == "add":
        attn_mask = mask.to(q.dtype) if mask.dtype != q.dtype and mask.dtype != torch.bool else mask
    elif mask_kind == "fill":  # masked_fill(mask, fill): True marks what is hidden
        attn_mask = ~mask if fill == float("-inf") else torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(mask, fill)
    else:
        raise ValueError(f"unknown mask kind {mask_kind!r}")
    return F.scaled_dot_product_attention(q, kt.transpose(-2, -1), v, attn_mask=attn_mask, scale=scale)


def attention_where(q, kt, v, keep, fill, scale):
    """where(keep, scores, fill) as an additive mask: 0 where kept, ``fill`` elsewhere."""
    attn_mask = torch.where(keep, torch.zeros((), dtype=q.dtype, device=q.device), fill.to(q.dtype))
    return F.scaled_dot_product_attention(q, kt.transpose(-2, -1), v, attn_mask=attn_mask, scale=scale)
