"""Colours and overlays: a fixed palette, hex parsing, colourised segment maps."""
from __future__ import annotations

import colorsys
import re
from typing import Iterable, Mapping

import numpy as np

# A pleasant, distinguishable palette (Tableau 20 reordered: saturated first, then light).
PALETTE: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
    "#9edae5", "#dbdb8d",
)
IGNORED_COLOUR = "#7f7f7f"
_HEX = re.compile(r"^#?([0-9a-fA-F]{6})$")


def normalise_hex(colour: str) -> str:
    """'#A1b2C3' / 'a1b2c3' -> '#a1b2c3'; anything else raises ValueError."""
    m = _HEX.match(colour.strip()) if isinstance(colour, str) else None
    if not m:
        raise ValueError(f"not a #rrggbb colour: {colour!r}")
    return "#" + m.group(1).lower()


def hex_to_rgb(colour: str) -> tuple[int, int, int]:
    h = normalise_hex(colour)
    return int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)


def rgb_to_hex(rgb: Iterable[int]) -> str:
    r, g, b = (int(max(0, min(255, round(c)))) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def palette_colour(i: int) -> str:
    """Colour i: the palette first, then golden-ratio hues (never the ignored grey)."""
    if i < len(PALETTE):
        return PALETTE[i]
    hue = ((i - len(PALETTE)) * 0.618033988749895 + 0.11) % 1.0
    sat = 0.55 + 0.3 * ((i // 3) % 2)
    return rgb_to_hex(255 * c for c in colorsys.hsv_to_rgb(hue, sat, 0.85))


def first_free_colour(used: Iterable[str], start: int = 0) -> str:
    """The first palette colour (from index `start`, wrapping) not in `used`."""
    taken = {u.lower() for u in used} | {IGNORED_COLOUR}
    n = len(PALETTE)
    for k in range(n):
        c = PALETTE[(start + k) % n]
        if c not in taken:
            return c
    i = n
    while palette_colour(i) in taken:
        i += 1
    return palette_colour(i)


def colourize(segmentation: np.ndarray, colours: Mapping[int, str | tuple[int, int, int]]) -> np.ndarray:
    """(H, W) cluster ids -> (H, W, 3) uint8; ids missing from `colours` become black."""
    seg = np.asarray(segmentation)
    if seg.size == 0:
        return np.zeros(seg.shape + (3,), np.uint8)
    top = int(seg.max()) + 1
    lut = np.zeros((max(top, 1), 3), np.uint8)
    for k, c in colours.items():
        if 0 <= k < top:
            lut[k] = hex_to_rgb(c) if isinstance(c, str) else c
    return lut[np.clip(seg, 0, top - 1)]


def blend(image: np.ndarray, colour_image: np.ndarray, mask: np.ndarray | None = None,
          opacity: float = 0.5) -> np.ndarray:
    """Alpha-blend `colour_image` over `image` where `mask` is True (everywhere if None)."""
    if image.shape != colour_image.shape:
        raise ValueError(f"image {image.shape} and colours {colour_image.shape} differ in shape")
    a = float(np.clip(opacity, 0.0, 1.0))
    out = image.astype(np.float32)
    mixed = (1.0 - a) * out + a * colour_image.astype(np.float32)
    if mask is None:
        out = mixed
    else:
        out[mask] = mixed[mask]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def highlight(image: np.ndarray, mask: np.ndarray, colour: str, opacity: float = 0.45,
              dim: float = 0.35) -> np.ndarray:
    """Tint the masked region with `colour` and darken the rest (cluster example thumbnails).

    `mask` is boolean, or a float coverage in [0, 1] per pixel (soft, antialiased edges).
    """
    rgb = np.array(hex_to_rgb(colour), np.float32)
    img = image.astype(np.float32)
    a = np.clip(np.asarray(mask, np.float32), 0.0, 1.0)[..., None]
    out = a * ((1.0 - opacity) * img + opacity * rgb) + (1.0 - a) * (dim * img)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) label map resampled to size = (height, width) by nearest pixel centre (ids stay ids)."""
    h, w = size
    src_h, src_w = labels.shape[:2]
    if (src_h, src_w) == (h, w):
        return labels
    rows = np.minimum(((np.arange(h) + 0.5) * (src_h / h)).astype(np.int64), src_h - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * (src_w / w)).astype(np.int64), src_w - 1)
    return labels[rows[:, None], cols[None, :]]
