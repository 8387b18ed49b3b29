"""A small PNG encoder (8-bit RGB, zlib + struct) and a perceptual colormap, for error heatmaps
and plots without a plotting library."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import torch

SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Viridis at nine evenly spaced stops (perceptually uniform, readable in grey and by most
# colour-blind readers); the 256-entry table interpolates linearly between them.
_VIRIDIS_STOPS = (
    (68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
    (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37),
)
NONFINITE_RGB = (255, 0, 255)  # NaN or Inf where the other side has a number: off the scale


class PNGError(ValueError):
    """Pixels that do not make an image of the stated size."""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode(width: int, height: int, rgb: bytes) -> bytes:
    """A PNG file of ``width`` x ``height`` 8-bit RGB pixels, ``rgb`` row-major (3 bytes a pixel)."""
    if width <= 0 or height <= 0 or len(rgb) != width * height * 3:
        raise PNGError(f"{len(rgb)} bytes are not {width}x{height} RGB pixels")
    stride = width * 3
    raw = b"".join(b"\x00" + rgb[y * stride:(y + 1) * stride] for y in range(height))  # filter 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")


def image_bytes(pixels: torch.Tensor) -> bytes:
    """A PNG file of a (height, width, 3) uint8 tensor."""
    if pixels.dim() != 3 or pixels.shape[2] != 3 or pixels.dtype != torch.uint8:
        raise PNGError(f"pixels must be (height, width, 3) uint8, not {tuple(pixels.shape)} {pixels.dtype}")
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    return encode(width, height, pixels.detach().cpu().contiguous().numpy().tobytes())


def write(path: str | os.PathLike, pixels: torch.Tensor) -> Path:
    """Write ``pixels`` (see :func:`image_bytes`) to ``path`` (written then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(image_bytes(pixels))
    os.replace(tmp, path)
    return path


def colormap_table() -> torch.Tensor:
    """The colormap as a (256, 3) uint8 table, dark (0) to bright (255)."""
    stops = torch.tensor(_VIRIDIS_STOPS, dtype=torch.float64)
    t = torch.linspace(0, len(_VIRIDIS_STOPS) - 1, 256, dtype=torch.float64)
    lo = t.floor().long().clamp(max=len(_VIRIDIS_STOPS) - 2)
    frac = (t - lo).unsqueeze(1)
    return (stops[lo] * (1 - frac) + stops[lo + 1] * frac).round().to(torch.uint8)


def colorize(values: torch.Tensor) -> torch.Tensor:
    """(h, w) values in [0, 1] as (h, w, 3) colormap pixels; NaN or Inf in magenta."""
    v = values.detach().cpu().double()
    finite = torch.isfinite(v)
    index = (torch.where(finite, v, 0).clamp(0, 1) * 255).round().long()
    pixels = colormap_table()[index]
    pixels[~finite] = torch.tensor(NONFINITE_RGB, dtype=torch.uint8)
    return pixels


def read_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG file's IHDR (for checking what was written)."""
    if data[:8] != SIGNATURE or data[12:16] != b"IHDR":
        raise PNGError("not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    return width, height
