"""What a person sees of a run's segmentation: coloured overlays and cluster example thumbnails.

Example thumbnails are cached per process (downscaled photo + supersampled cluster map),
so after a name/merge/colour edit only the tint is redone.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import numpy as np
from sqlalchemy import select

from core.rundir import RunDir, segment_kind
from stego_app.errors import NotFound, UserError
from stego_app.labels.mapping import LegendEntry, get_done_run, legend_entries, snapshot
from stego_app.models import Image, RunImage
from stego_app.render import blend, colourize, hex_to_rgb, highlight, resize_nearest
from stego_app.thumbnails import load_rgb_fit

log = logging.getLogger(__name__)

DISPLAY_MAX_SIDE = 1024          # render_segmentation's default size limit (long side, pixels)
MIN_DISPLAY_SIDE = 16
EXAMPLE_SUPERSAMPLE = 4          # segment map samples per thumbnail pixel and axis (soft edges)
EXAMPLE_CACHE_BYTES = 64 << 20   # memory for cached example thumbnails (per process)


@dataclass(frozen=True)
class SegmentationView:
    image_id: int
    original: np.ndarray
    overlay: np.ndarray
    segmentation: np.ndarray
    legend: list[LegendEntry]
    crf: bool
    confirmed: bool
    refined: bool = False        # refined (propagated) maps were shown


# ---------------------------------------------------------------- segment maps and overlays

def _position(s, run_id: int, image_id: int) -> tuple[int, Image, bool]:
    row = s.execute(select(RunImage, Image).join(Image, RunImage.image_id == Image.id)
                    .where(RunImage.run_id == run_id, RunImage.image_id == image_id)).first()
    if row is None:
        raise NotFound(f"image {image_id} is not part of run {run_id}")
    ri, img = row
    return ri.position, img, ri.confirmed


def read_segments(run_dir: Path, position: int, crf: bool, size: tuple[int, int] | None = None,
                  refined: bool = False) -> np.ndarray:
    """(H, W) int32 cluster ids of run item `position` (nearest-resized to size=(w, h) if given): the
    refined (propagated) maps when `refined`, else the plain or CRF ones; found regions on top
    (stego_app.segmaps); a missing map is a UserError."""
    from stego_app import segmaps

    return segmaps.read_map(run_dir, position, "refined" if refined else segment_kind(crf), size)


def render_segmentation(ctx, run_id: int, image_id: int, crf: bool = False, opacity: float = 0.5,
                        hidden: Collection[int] = (), max_side: int | None = DISPLAY_MAX_SIDE,
                        refined: bool = False) -> SegmentationView:
    """The image, its coloured overlay (hidden clusters left uncoloured) and its legend.

    `max_side` limits the long side of `original`, `overlay` and `segmentation` (the photo
    is area-downscaled, the cluster map resampled by nearest pixel); None = full size.
    Legend shares are always counted on the full-size segment map.
    """
    if max_side is not None and (isinstance(max_side, bool) or int(max_side) < MIN_DISPLAY_SIDE):
        raise UserError(f"the display size {max_side!r} must be at least {MIN_DISPLAY_SIDE} pixels")
    with ctx.db.read() as s:
        mapping = snapshot(s, get_done_run(s, run_id))
        position, img, confirmed = _position(s, run_id, image_id)
        path = Path(img.path)
    if not path.is_file():
        raise UserError(f"the file of image {img.name} is missing: {path}")
    original = load_rgb_fit(path, None if max_side is None else int(max_side), ctx.config.max_image_pixels)
    h, w = original.shape[:2]
    use_crf = bool(crf and mapping.has_crf)
    from stego_app.segmaps import has_maps

    use_refined = bool(refined and has_maps(mapping.run_dir, "refined", [position]))
    full = read_segments(mapping.run_dir, position, use_crf, refined=use_refined)
    counts = np.bincount(full.ravel(), minlength=max(len(mapping.clusters), int(full.max()) + 1))
    shares = {i: float(n) / full.size for i, n in enumerate(counts) if n}
    seg = resize_nearest(full, (h, w))
    colour_img = colourize(seg, {k: hex_to_rgb(v) for k, v in mapping.colours().items()})
    mask = ~np.isin(seg, np.fromiter((int(i) for i in hidden), dtype=np.int32)) if hidden else None
    overlay = blend(original, colour_img, mask, opacity)
    entries = [e for e in legend_entries(mapping, shares) if e.share > 0]
    return SegmentationView(image_id=image_id, original=original, overlay=overlay, segmentation=seg,
                            legend=entries, crf=use_crf, confirmed=confirmed, refined=use_refined)


class _ByteLRU:
    """A thread-safe least-recently-used cache of numpy arrays, bounded by their total bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, tuple[np.ndarray, ...]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> tuple[np.ndarray, ...] | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: tuple[np.ndarray, ...]) -> None:
        size = sum(a.nbytes for a in value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= sum(a.nbytes for a in old)
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= sum(a.nbytes for a in dropped)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


# Downscaled photo + supersampled cluster map per (segment file, image file, size). Neither
# depends on names, merges or colours, so edits re-tint cached pieces instead of decoding
# images again; a changed file (new mtime or size) is a new key.
_EXAMPLE_CACHE = _ByteLRU(EXAMPLE_CACHE_BYTES)
_COVERAGE_CACHE = _ByteLRU(EXAMPLE_CACHE_BYTES // 4)   # per (segment map, cluster): what a name edit keeps


def _coverage(base_key: tuple, seg: np.ndarray, index: int, k: int) -> np.ndarray:
    """(h, w) uint8: how many of the k x k map samples under each thumbnail pixel are cluster ``index``
    (``base_key``: the example's cache key, which changes with its map)."""
    key = base_key + (int(index),)
    cached = _COVERAGE_CACHE.get(key)
    if cached is not None:
        return cached[0]
    H, W = seg.shape
    cov = (seg == index).view(np.uint8).reshape(H // k, k, W).sum(axis=1, dtype=np.uint8)
    cov = cov.reshape(H // k, W // k, k).sum(axis=2, dtype=np.uint8)
    _COVERAGE_CACHE.put(key, (cov,))
    return cov


def _example_base(run_dir: Path, position: int, path: Path, size: int,
                  max_pixels: int) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(photo with long side <= size, raw cluster map at EXAMPLE_SUPERSAMPLE x its size, cache key)."""
    seg_path = RunDir(run_dir).segment_path(position, "plain")
    try:
        seg_stat, img_stat = seg_path.stat(), path.stat()
    except OSError as exc:
        raise UserError(f"a file of example item {position} is missing: {exc.filename}") from None
    from stego_app.segmaps import version_key

    key = (str(seg_path), seg_stat.st_mtime_ns, seg_stat.st_size,
           str(path), img_stat.st_mtime_ns, img_stat.st_size, size, version_key(run_dir))
    cached = _EXAMPLE_CACHE.get(key)
    if cached is not None:
        return cached[0], cached[1], key
    rgb = load_rgb_fit(path, size, max_pixels)
    h, w = rgb.shape[:2]
    full = read_segments(run_dir, position, False)
    seg = resize_nearest(full, (h * EXAMPLE_SUPERSAMPLE, w * EXAMPLE_SUPERSAMPLE))
    seg = seg.astype(np.uint8 if int(seg.max(initial=0)) < 256 else np.uint16)
    _EXAMPLE_CACHE.put(key, (rgb, seg))
    return rgb, seg, key


def cluster_examples(ctx, run_id: int, cluster_index: int, n: int = 4,
                     size: int = 192) -> list[tuple[int, np.ndarray]]:
    """Thumbnails of the cluster's best example images, the cluster tinted, the rest dimmed.

    The downscaled images are cached per process, so after a name/merge/colour edit only
    the tint is redone (milliseconds, not a decode of every example photo).
    """
    return examples_of_clusters(ctx, run_id, [cluster_index], n, size)[cluster_index]


def examples_of_clusters(ctx, run_id: int, cluster_indices: Sequence[int] | None = None, n: int = 4,
                         size: int = 192) -> dict[int, list[tuple[int, np.ndarray]]]:
    """``cluster_examples`` of many clusters (default: all) from one read of the mapping.

    One database snapshot for all of them: the Clusters tab redraws every card after each edit,
    and a snapshot per cluster made that grow with the square of K.
    """
    if isinstance(size, bool) or int(size) < MIN_DISPLAY_SIDE:
        raise UserError(f"the thumbnail size {size!r} must be at least {MIN_DISPLAY_SIDE} pixels")
    with ctx.db.read() as s:
        mapping = snapshot(s, get_done_run(s, run_id))
        by_index = {c.index: c for c in mapping.clusters}
        wanted = list(by_index) if cluster_indices is None else [int(i) for i in cluster_indices]
        missing = [i for i in wanted if i not in by_index]
        if missing:
            raise NotFound(f"run {run_id} has no cluster {missing[0]}")
        image_ids = {i for c in wanted for i in by_index[c].example_image_ids[:max(0, n)]}
        places = {}
        for image_id in image_ids:
            position, img, _ = _position(s, run_id, image_id)
            places[image_id] = (position, Path(img.path))
    k = EXAMPLE_SUPERSAMPLE
    out: dict[int, list[tuple[int, np.ndarray]]] = {}
    for index in wanted:
        cluster = by_index[index]
        out[index] = []
        for image_id in cluster.example_image_ids[:max(0, n)]:
            position, path = places[image_id]
            try:
                rgb, seg, base_key = _example_base(mapping.run_dir, position, path, int(size),
                                                   ctx.config.max_image_pixels)
            except (UserError, OSError) as exc:
                log.warning("example image %s of cluster %s unavailable: %s", image_id, index, exc)
                continue
            coverage = _coverage(base_key, seg, index, k) / (k * k)
            out[index].append((image_id, highlight(rgb, coverage, cluster.colour)))
    return out
