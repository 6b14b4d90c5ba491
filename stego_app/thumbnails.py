"""Display-size images: cached thumbnail files for galleries, downscaled decoding for views.

Thumbnails are JPEG files under ``<data_dir>/thumbs/<size>/<sha[:2]>/<sha256>.jpg``. They are
keyed by the image's content hash, so projects holding the same image share one file, a
thumbnail never goes stale (an image's bytes do not change under its hash) and a deleted
one is simply made again. Pixels come from core.images.load_image (EXIF orientation, every
mode, transparency on white); big JPEGs are decoded at a reduced scale, so a thumbnail of
a 12-megapixel photo takes a few tens of milliseconds.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from core.atomic import atomic_path
from core.errors import ImageLoadError
from core.images import DEFAULT_MAX_PIXELS, image_size, load_image
from stego_app.errors import NotFound, UserError
from stego_app.ingest import ImageInfo, get_image, image_info
from stego_app.models import IMAGE_OK, Image, Project, Run, RunImage

log = logging.getLogger(__name__)

DEFAULT_SIZE = 256
MIN_SIZE, MAX_SIZE = 16, 2048
JPEG_QUALITY = 85
PER_PAGE = 100               # gallery page size
_WORKERS = max(1, min(4, os.cpu_count() or 1))   # decoding releases the GIL: make a page in parallel


@dataclass(frozen=True)
class GalleryPage:
    """One page of a gallery: the images that could be shown, with their thumbnail files."""

    items: tuple[tuple[ImageInfo, Path], ...]
    page: int              # 1-based, after clamping
    n_pages: int
    start: int             # items [start, stop) of `total`
    stop: int
    total: int


def fit_within(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled so the long side is at most `max_side` (never enlarged, >= 1 px)."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def load_rgb_fit(path: Path, max_side: int | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """HxWx3 uint8 of an image file, EXIF-rotated, its long side at most `max_side`.

    Downscaling averages the covered area (Pillow's box filter, like OpenCV's INTER_AREA);
    JPEGs are decoded at a reduced scale first. UserError if unreadable.
    """
    path = Path(path)
    try:
        if max_side is None:
            return load_image(path, max_pixels=max_pixels)
        h, w = image_size(path, max_pixels=max_pixels)
        tw, th = fit_within(w, h, max_side)
        rgb = load_image(path, max_pixels=max_pixels, min_size=(th, tw))
    except ImageLoadError as exc:
        raise UserError(f"cannot read image {path.name}: {exc.reason}") from None
    if rgb.shape[:2] == (th, tw):
        return rgb
    return np.asarray(PILImage.fromarray(rgb).resize((tw, th), PILImage.Resampling.BOX))


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"thumbnail size {size!r} must be a whole number from {MIN_SIZE} to {MAX_SIZE}")
    return int(size)


def thumbnail_file(config, image: ImageInfo, size: int = DEFAULT_SIZE) -> Path:
    """The cached thumbnail of `image` (made now if missing): long side at most `size` px."""
    size = _check_size(size)
    target = config.thumbs_dir / str(size) / image.sha256[:2] / f"{image.sha256}.jpg"
    if target.is_file():
        return target
    source = Path(image.path)
    if not source.is_file():
        raise UserError(f"the file of image {image.name} is missing: {source}")
    rgb = load_rgb_fit(source, size, config.max_image_pixels)
    with atomic_path(target, ".jpg") as tmp:   # a concurrent request sees a whole file or none
        PILImage.fromarray(rgb).save(tmp, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    log.debug("thumbnail %s (%dx%d) of image %s", target, rgb.shape[1], rgb.shape[0], image.id)
    return target


def thumbnail_path(ctx, image_id: int, size: int = DEFAULT_SIZE) -> Path:
    """Path of a small cached JPEG of the image (EXIF-rotated, long side <= `size`).

    NotFound for an unknown image; UserError when its file is missing or unreadable.
    """
    return thumbnail_file(ctx.config, get_image(ctx, image_id), size)


def thumbnail_files(ctx, images: Sequence[ImageInfo], size: int = DEFAULT_SIZE) -> list[tuple[ImageInfo, Path]]:
    """Thumbnails of many images, in order; images that cannot be shown are left out and logged."""
    size = _check_size(size)

    def one(image: ImageInfo) -> tuple[ImageInfo, Path] | None:
        try:
            return image, thumbnail_file(ctx.config, image, size)
        except (UserError, OSError) as exc:
            log.warning("no thumbnail for image %s (%s): %s", image.id, image.name, exc)
            return None

    if len(images) > 1 and _WORKERS > 1:
        with ThreadPoolExecutor(_WORKERS, thread_name_prefix="stego-thumbs") as pool:
            made = list(pool.map(one, images))
    else:
        made = [one(i) for i in images]
    return [m for m in made if m is not None]


def page_bounds(total: int, page: Any, per_page: int) -> tuple[int, int, int, int]:
    """(start, stop, page, n_pages) of 1-based `page` over `total` items; junk or out-of-range
    page numbers are clamped (an empty list still has one, empty, page)."""
    if per_page < 1:
        raise ValueError(f"per_page must be positive, got {per_page}")
    n_pages = max(1, -(-int(total) // per_page))
    try:
        wanted = round(float(page))
    except (TypeError, ValueError, OverflowError):
        wanted = 1
    page_no = min(max(1, wanted), n_pages)
    start = (page_no - 1) * per_page
    return start, min(int(total), start + per_page), page_no, n_pages


def gallery_page(ctx, images: Sequence[ImageInfo], page: Any = 1, per_page: int = PER_PAGE,
                 size: int = DEFAULT_SIZE) -> GalleryPage:
    """Page `page` of `images` with thumbnails (only that page's thumbnails are made)."""
    start, stop, page_no, n_pages = page_bounds(len(images), page, per_page)
    items = thumbnail_files(ctx, images[start:stop], size)
    return GalleryPage(items=tuple(items), page=page_no, n_pages=n_pages, start=start, stop=stop,
                       total=len(images))


def project_gallery(ctx, project_id: int, page: Any = 1, per_page: int = PER_PAGE,
                    size: int = DEFAULT_SIZE) -> GalleryPage:
    """A page of the project's usable images (ingest order)."""
    with ctx.db.read() as s:
        if s.get(Project, project_id) is None:
            raise NotFound(f"project {project_id} does not exist")
        rows = s.scalars(select(Image).where(Image.project_id == project_id, Image.status == IMAGE_OK)
                         .order_by(Image.id)).all()
        images = [image_info(r) for r in rows]
    return gallery_page(ctx, images, page, per_page, size)


def run_gallery(ctx, run_id: int, page: Any = 1, per_page: int = PER_PAGE,
                size: int = DEFAULT_SIZE) -> GalleryPage:
    """A page of the run's images in pipeline order."""
    with ctx.db.read() as s:
        if s.get(Run, run_id) is None:
            raise NotFound(f"run {run_id} does not exist")
        rows = s.scalars(select(Image).join(RunImage, RunImage.image_id == Image.id)
                         .where(RunImage.run_id == run_id).order_by(RunImage.position)).all()
        images = [image_info(r) for r in rows]
    return gallery_page(ctx, images, page, per_page, size)
