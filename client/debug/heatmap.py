"""Error heatmaps and the summary plot, as PNG pixels.

A tensor's ``|error|`` is viewed as (leading, rows, cols): 1-D tensors as a near-square strip,
2-D as they are, N-D reduced by ``max`` over the leading dimensions. It is max-pooled to at most
:data:`MAX_SIDE` on each side, chunk by chunk (no full error tensor is held), then coloured on a
log scale over :data:`DECADES` decades below its largest value; small maps are scaled up.
"""

from __future__ import annotations

import math
import re

import torch

from hypatia.debug import png

MAX_SIDE = 512
TARGET_SIDE = 256  # small maps are scaled up by a whole factor towards this size
MAX_SCALE = 16
DECADES = 6


def layout(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(leading, rows, cols) the error of a tensor of ``shape`` is drawn as."""
    if len(shape) == 0:
        return 1, 1, 1
    if len(shape) == 1:
        cols = max(1, math.ceil(math.sqrt(shape[0])))
        return 1, max(1, math.ceil(shape[0] / cols)), cols
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def pooled_size(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of the pooled map of a tensor of ``shape``, each at most :data:`MAX_SIDE`."""
    _, rows, cols = layout(shape)
    return math.ceil(rows / math.ceil(rows / MAX_SIDE)), math.ceil(cols / math.ceil(cols / MAX_SIDE))


def scale_of(rows: int, cols: int) -> int:
    """The whole factor a pooled map of this size is scaled up by."""
    return max(1, min(MAX_SCALE, TARGET_SIDE // max(rows, cols)))


def image_size(shape: tuple[int, ...]) -> tuple[int, int]:
    """(width, height) in pixels of the heatmap of a tensor of ``shape``."""
    rows, cols = pooled_size(shape)
    s = scale_of(rows, cols)
    return cols * s, rows * s


def error_map(actual: torch.Tensor, reference: torch.Tensor, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """The max-pooled ``|actual - reference|`` as a float64 CPU tensor of :func:`pooled_size`;
    Inf where only one side is NaN/Inf, 0 where both hold the same NaN/Inf."""
    shape = tuple(actual.shape)
    lead, rows, cols = layout(shape)
    ph, pw = math.ceil(rows / MAX_SIDE), math.ceil(cols / MAX_SIDE)
    out_r, out_c = math.ceil(rows / ph), math.ceil(cols / pw)
    grid = torch.zeros(out_r, out_c, dtype=torch.float64)
    if actual.numel() == 0:
        return grid
    a_all = actual.detach().reshape(-1)
    b_all = reference.detach().to(actual.device).reshape(-1)
    if a_all.is_complex():
        a_all, b_all = a_all.abs(), b_all.abs()
    n = a_all.numel()
    # one block: some leading slices of some pooled row bands, at most about chunk_elems elements
    band = ph * cols
    bands_per_block = max(1, chunk_elems // band)
    slices_per_block = max(1, chunk_elems // (rows * cols)) if bands_per_block >= out_r else 1
    for l0 in range(0, lead, slices_per_block):
        l1 = min(lead, l0 + slices_per_block)
        for r0 in range(0, out_r, bands_per_block):
            r1 = min(out_r, r0 + bands_per_block)
            rows_here = min(rows, r1 * ph) - r0 * ph
            pieces_a, pieces_b = [], []
            for lead_i in range(l0, l1):
                s = lead_i * rows * cols + r0 * ph * cols
                e = min(s + rows_here * cols, n)
                pieces_a.append(_padded(a_all[s:e], rows_here * cols))
                pieces_b.append(_padded(b_all[s:e], rows_here * cols))
            a = torch.stack(pieces_a).double().view(l1 - l0, rows_here, cols)
            b = torch.stack(pieces_b).double().view(l1 - l0, rows_here, cols)
            both = torch.isfinite(a) & torch.isfinite(b)
            same = (torch.isnan(a) & torch.isnan(b)) | (a == b)
            err = torch.where(both, (a - b).abs(), torch.where(same, 0.0, float("inf"))).amax(0)
            err = torch.nn.functional.pad(err, (0, out_c * pw - cols, 0, (r1 - r0) * ph - rows_here))
            pooled = err.view(r1 - r0, ph, out_c, pw).amax(dim=(1, 3)).cpu()
            grid[r0:r1] = torch.maximum(grid[r0:r1], pooled)
    return grid


def _padded(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` with zeros after it up to ``length`` (the last row of a 1-D strip)."""
    return t if t.numel() == length else torch.cat([t, t.new_zeros(length - t.numel())])


def _normalized(values: torch.Tensor) -> torch.Tensor:
    """Values mapped to [0, 1] on a log scale over DECADES decades below the largest finite one."""
    finite = values[torch.isfinite(values)]
    top = float(finite.max()) if finite.numel() else 0.0
    if top <= 0:
        return torch.where(torch.isfinite(values), 0.0, values)
    low = top / 10 ** DECADES
    t = (torch.log10(values.clamp(min=low)) - math.log10(low)) / DECADES
    return torch.where(values > 0, t, 0.0)  # exact zeros darkest; Inf stays Inf (magenta)


def heatmap_pixels(grid: torch.Tensor) -> torch.Tensor:
    """The (height, width, 3) pixels of a pooled error map (see :func:`error_map`)."""
    pixels = png.colorize(_normalized(grid))
    s = scale_of(*grid.shape)
    return pixels.repeat_interleave(s, 0).repeat_interleave(s, 1) if s > 1 else pixels


SUMMARY_HEIGHT = 200
BAR_WIDTH = 24
BAR_GAP = 8
PASS_RGB, FAIL_RGB, GRID_RGB, BG_RGB = (60, 160, 90), (210, 50, 50), (215, 215, 215), (255, 255, 255)


def summary_size(count: int) -> tuple[int, int]:
    """(width, height) in pixels of the summary plot of ``count`` tensors."""
    return BAR_GAP + max(1, count) * (BAR_WIDTH + BAR_GAP), SUMMARY_HEIGHT


def summary_pixels(max_abs: list[float], passed: list[bool]) -> torch.Tensor:
    """A bar per tensor, in order: its max |error| on a log scale (one grey line a decade, the
    top line the next decade above the largest), green if it passed, red if not; an Inf error
    fills its column, a zero error draws no bar."""
    width, height = summary_size(len(max_abs))
    pixels = torch.tensor(BG_RGB, dtype=torch.uint8).repeat(height, width, 1)
    finite = [v for v in max_abs if math.isfinite(v) and v > 0]
    top_exp = math.ceil(math.log10(max(finite))) if finite else 0
    bottom_exp = (math.floor(math.log10(min(finite))) if finite else -1)
    bottom_exp = min(bottom_exp, top_exp - 3)  # at least three decades drawn
    span = top_exp - bottom_exp
    plot = height - 1

    def y_of(v: float) -> int:
        return plot - round((math.log10(v) - bottom_exp) / span * plot)

    for e in range(bottom_exp, top_exp + 1):
        pixels[y_of(10.0 ** e)] = torch.tensor(GRID_RGB, dtype=torch.uint8)
    for i, (v, ok) in enumerate(zip(max_abs, passed)):
        if not v > 0:
            continue
        x0 = BAR_GAP + i * (BAR_WIDTH + BAR_GAP)
        y0 = 0 if not math.isfinite(v) else y_of(v)
        pixels[y0:height, x0:x0 + BAR_WIDTH] = torch.tensor(PASS_RGB if ok else FAIL_RGB, dtype=torch.uint8)
    return pixels


def file_name(index: int, name: str) -> str:
    """The heatmap file of the ``index``-th tensor named ``name``: ``NN-<name, filename-safe>.png``."""
    return f"{index:02d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:80]}.png"
