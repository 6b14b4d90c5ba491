"""Token features at twice the grid density, at the same token scale.

A ViT sees an image as a grid of patches of side p; a thing narrower than a patch (a pole, a
sign) shares every token with its surroundings. Seeing the image larger changes the scale the
tokens were trained on. Here the image is seen four times at its usual size, shifted by a
quarter patch up/left and down/right (sub-pixel, bicubic), and the four token grids are
interleaved into one of (2h, 2w) whose cell centres sit at (j + 0.5) * p / 2: exactly the
geometry ``core.clustering.upsample_bilinear`` (align_corners=False) assumes, so the dense grid
upsamples like any other. Each token still covers one p x p patch of the usual scale: a
classifier trained on the stored (h, w) tokens reads them unchanged.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from core.features import backbone_forward
from core.images import load_image

if TYPE_CHECKING:
    from core.backbones import Backbone

DENSITY = 2                                        # dense grid cells per stored token, per side
SHIFTS = ((-1, -1), (-1, 1), (1, -1), (1, 1))      # (sy, sx): quarter-patch shifts of the views


def shifted_views(rgb: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    """(4, h*p, w*p, 3) uint8: ``rgb`` resized to the token grid ``grid`` = (h, w) and shifted by
    a quarter patch in each direction of ``SHIFTS`` (edges reflected)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    h, w = (int(v) for v in grid)
    if h < 1 or w < 1:
        raise ValueError(f"grid must be at least 1x1, got {grid}")
    H, W = rgb.shape[:2]
    oh, ow = h * patch, w * patch
    sy, sx = H / oh, W / ow                     # source pixels per output pixel
    d = patch / 4.0                             # the shift, in output pixels
    pad = int(math.ceil(d * max(sy, sx))) + 2
    src = Image.fromarray(np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="reflect"))
    views = []
    for dy, dx in SHIFTS:
        top, left = pad + dy * d * sy, pad + dx * d * sx
        box = (left, top, left + W, top + H)
        views.append(np.asarray(src.resize((ow, oh), Image.Resampling.BICUBIC, box=box)))
    return np.stack(views)


def interleave(grids: np.ndarray) -> np.ndarray:
    """(4, h, w, C) token grids of the ``SHIFTS`` views -> (2h, 2w, C), row-major by position."""
    n, h, w, C = grids.shape
    if n != len(SHIFTS):
        raise ValueError(f"expected {len(SHIFTS)} grids (one per shift), got {n}")
    out = np.empty((DENSITY * h, DENSITY * w, C), dtype=grids.dtype)
    for g, (dy, dx) in zip(grids, SHIFTS):
        out[(dy > 0)::DENSITY, (dx > 0)::DENSITY] = g
    return out


def dense_tokens(backbone: Backbone, rgb: np.ndarray, grid: tuple[int, int], precision: str = "float32"
                 ) -> np.ndarray:
    """(2h * 2w, C) float32 tokens of ``rgb`` on the dense grid of its (h, w) token grid."""
    views = shifted_views(rgb, grid, backbone.patch_size)
    x = torch.stack([backbone.preprocess(v) for v in views]).to(backbone.device)
    f, _ = backbone_forward(backbone, x, False, precision)       # (4, h, w, C)
    dense = interleave(f.cpu().numpy())
    return dense.reshape(-1, dense.shape[-1])


def dense_item(backbone: Backbone, image_path, grid: tuple[int, int], precision: str = "float32"
               ) -> tuple[np.ndarray, tuple[int, int]]:
    """The dense tokens of the image at ``image_path``, whose stored token grid is ``grid``, and the
    dense grid they lie on, (2h, 2w)."""
    h, w = (int(v) for v in grid)
    return dense_tokens(backbone, load_image(image_path), (h, w), precision), (DENSITY * h, DENSITY * w)
