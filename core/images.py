"""Image decoding and geometry: any file/mode/orientation -> RGB uint8, sizes, resizing, crops.

``load_image`` is the one decoder of the project (the app's ingestion reuses it): it applies
the EXIF orientation, converts every PIL mode (grayscale, palette, 16-bit, float, CMYK,
alpha) to RGB uint8, refuses decompression bombs and reports corrupt or truncated files as
``ImageLoadError``.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

import re

from core.errors import ImageLoadError, PixelLimitError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 80_000_000
WHITE = (255, 255, 255)
# EXIF orientations 5..8 swap width and height.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}


def _open(path: str | Path, max_pixels: int) -> Image.Image:
    """Open (header only) with our own pixel limit; errors become ImageLoadError."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False: "
                           "truncated files would decode silently as grey")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image (unrecognised file format)") from None
    except Image.DecompressionBombError as exc:  # PIL's own, larger limit: the same message as ours
        raise pixel_limit_error(path, bomb_pixels(exc), max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(path, f"corrupt image: {exc}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        img.close()
        raise ImageLoadError(path, "image has no pixels")
    if w * h > max_pixels:
        img.close()
        raise pixel_limit_error(path, w * h, max_pixels, f"{w}x{h} = ")
    return img


def bomb_pixels(exc: Exception) -> int | None:
    """The pixel count PIL names in a DecompressionBombError ("Image size (N pixels) ...")."""
    m = re.search(r"\((\d+) pixels\)", str(exc))
    return int(m.group(1)) if m else None


def pixel_limit_error(path: str | Path, pixels: int | None, limit: int, size: str = "") -> PixelLimitError:
    """The one message for an image over the pixel limit (callers may add how to raise it)."""
    count = f"{size}{pixels:,} pixels" if pixels is not None else "more pixels than the decoder allows"
    return PixelLimitError(path, f"too many pixels: {count} exceeds the limit of {limit:,} "
                           "(possible decompression bomb)", pixels, limit)


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - malformed EXIF: ignore the orientation, keep the pixels
        return 1


def image_size(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) after the EXIF orientation, read from the header only."""
    with _open(path, max_pixels) as img:
        w, h = img.size
        if _orientation(img) in _SWAPPING_ORIENTATIONS:
            w, h = h, w
    return h, w


def _to_rgb(img: Image.Image, background: tuple[int, int, int] | None) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is composited on ``background`` (or dropped when None)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F" or arr.dtype.kind == "f":
            arr = arr.astype(np.float64)
            lo, hi = np.nanmin(arr), np.nanmax(arr)
            if lo >= 0.0 and hi <= 1.0:
                arr = arr * 255.0
            elif hi > lo:
                arr = (arr - lo) * (255.0 / (hi - lo))
            arr = np.nan_to_num(arr)
        else:
            arr = arr.astype(np.int64)
            hi = int(arr.max()) if arr.size else 0
            if mode.startswith("I;16") or 255 < hi <= 65535:  # 16-bit data -> 8 bit
                arr = arr / 257.0
            elif hi > 65535:  # 32-bit integers: stretch to the data's range
                arr = arr * (255.0 / hi)
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        if background is None:
            return rgba.convert("RGB")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
               background: tuple[int, int, int] | None = WHITE,
               min_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file to an RGB uint8 (H, W, 3) array in its displayed orientation.

    ``background``: colour that transparent pixels are composited on (None drops alpha).
    ``min_size``: (height, width) the caller needs at least; JPEGs are then decoded at a
    reduced scale when that still leaves at least this size (much faster for big photos).
    Raises ImageLoadError for missing, unrecognised, corrupt, truncated or too-large files.
    """
    img = _open(path, max_pixels)
    try:
        orientation = _orientation(img)
        if min_size is not None and img.format == "JPEG":
            need_h, need_w = min_size
            if orientation in _SWAPPING_ORIENTATIONS:
                need_h, need_w = need_w, need_h
            img.draft("RGB", (max(1, need_w), max(1, need_h)))
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
            raise ImageLoadError(path, f"corrupt or truncated image: {exc}") from None
        except MemoryError:
            raise ImageLoadError(path, "not enough memory to decode the image") from None
        if orientation != 1:
            try:
                img = ImageOps.exif_transpose(img)
            except Exception as exc:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
                log.warning("%s: ignoring unreadable EXIF orientation (%s)", path, exc)
        rgb = _to_rgb(img, background)
        return np.array(rgb, dtype=np.uint8)  # a writable copy
    finally:
        img.close()


def target_size(height: int, width: int, resolution: int, patch_size: int,
                max_long_side: int | None = None) -> tuple[int, int]:
    """Output (H, W): short side = ``resolution``, long side capped, both floored to the patch.

    Never smaller than one patch per side.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if resolution < patch_size:
        raise ValueError(f"resolution {resolution} is smaller than the patch size {patch_size}")
    scale = resolution / min(height, width)
    if max_long_side is not None and max(height, width) * scale > max_long_side:
        scale = max_long_side / max(height, width)
    h = max(patch_size, round(height * scale) // patch_size * patch_size)
    w = max(patch_size, round(width * scale) // patch_size * patch_size)
    return h, w


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to ``size`` = (height, width), bicubic with antialiasing."""
    h, w = size
    if rgb.shape[:2] == (h, w):
        return rgb
    out = Image.fromarray(np.ascontiguousarray(rgb)).resize((w, h), Image.Resampling.BICUBIC)
    return np.array(out)


def five_crop_boxes(height: int, width: int, ratio: float = 0.5) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of the 4 corner crops and the centre crop, each ``ratio`` of a side."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"crop ratio must be in (0, 1], got {ratio}")
    ch, cw = max(1, round(height * ratio)), max(1, round(width * ratio))
    return [(0, 0, ch, cw), (0, width - cw, ch, cw), (height - ch, 0, ch, cw),
            (height - ch, width - cw, ch, cw), ((height - ch) // 2, (width - cw) // 2, ch, cw)]


def crop(rgb: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """The (top, left, height, width) box of an (H, W, 3) image."""
    top, left, h, w = box
    return rgb[top:top + h, left:left + w]
