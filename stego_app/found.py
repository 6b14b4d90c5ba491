"""Click to find more of a thing: correspondence queries and the clusters made from them.

A click on an image of a finished run picks one token of its cached backbone features; its
cosine similarity to every token of the corpus (core.correspondence, an index built once per
run in ``run_dir/correspondence``) gives a heat map of this image and the best-matching
regions of the others. The person can turn the region above a similarity threshold into a
new *found cluster* (index K, K+1, ...), named or added to an existing label like any other
cluster. Its similarities are stored (``found/<index>.f16``, one float16 per token, and
``found/found.json``), so overlays, examples, exports and propagation paint it on top of the
cluster maps (stego_app.segmaps); removing it restores the maps underneath.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select

from core.atomic import atomic_write_bytes, atomic_write_json
from core.correspondence import DEFAULT_THRESHOLD, CorrespondenceIndex
from core.rundir import FeaturesMissing, RunDir
from stego_app import edit_versions, segmaps
from stego_app.db import lock_for_update
from stego_app.errors import NotFound, UserError
from stego_app.labels import mapping
from stego_app.models import Cluster, Image, Run, RunImage
from stego_app.render import palette_colour
from stego_app.thumbnails import load_rgb_fit

log = logging.getLogger(__name__)

N_MATCHES = 8
MATCH_SIZE = 160
N_EXAMPLES = 8
_BUILD_LOCK = threading.Lock()


@dataclass(frozen=True)
class Match:
    image_id: int
    name: str
    similarity: float              # best token of that image
    coverage: float                # share of its tokens at or above the threshold
    thumbnail: np.ndarray          # HxWx3 uint8, the region above the threshold highlighted


@dataclass(frozen=True)
class Correspondence:
    run_id: int
    image_id: int
    cell: tuple[int, int]          # (row, column) of the clicked token
    grid: tuple[int, int]          # (rows, columns) of the image's token grid
    threshold: float
    heat: np.ndarray               # (rows, cols) float32 similarity of this image's tokens
    overlay: np.ndarray            # HxWx3 uint8: the image with the heat map on top
    matches: tuple[Match, ...]     # best other images, best first
    corpus_share: float            # estimated share of all pixels at or above the threshold


def _run_and_position(ctx, run_id: int, image_id: int):
    with ctx.db.read() as s:
        run = mapping.get_done_run(s, run_id, needs="click-to-find works on finished runs")
        row = s.execute(select(RunImage.position, Image).join(Image, RunImage.image_id == Image.id)
                        .where(RunImage.run_id == run_id, RunImage.image_id == image_id)).first()
        if row is None:
            raise NotFound(f"image {image_id} is not part of run {run_id}")
        return Path(run.run_dir), int(row[0]), row[1].name, Path(row[1].path), (row[1].height, row[1].width)


def infer_store(run_dir: Path):
    """The run's cached whole-image features, or a UserError that says what to do."""
    try:
        return RunDir(run_dir).infer_store()
    except FeaturesMissing as exc:
        raise UserError(f"{exc}; resume or re-run discovery to extract them again") from None


def _run_dir(ctx, run_id: int) -> Path:
    with ctx.db.read() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} does not exist")
        return Path(run.run_dir)


def ensure_index(ctx, run_id: int, progress=None) -> CorrespondenceIndex:
    """The run's correspondence index, built from its cached features on first use (seconds)."""
    run_dir = _run_dir(ctx, run_id)
    index = segmaps.correspondence_index(run_dir)
    if index is not None:
        return index
    with _BUILD_LOCK:
        index = segmaps.correspondence_index(run_dir)
        if index is None:
            store = infer_store(run_dir)
            CorrespondenceIndex.build(store, RunDir(run_dir).correspondence_dir, source=str(store.root), progress=progress)
            index = segmaps.correspondence_index(run_dir)
    return index


def _sizes(ctx, run_id: int) -> dict[int, tuple[int, int, int, str, Path]]:
    """position -> (image_id, H, W, name, path)."""
    with ctx.db.read() as s:
        rows = s.execute(select(RunImage.position, Image.id, Image.height, Image.width, Image.name, Image.path)
                         .join(Image, RunImage.image_id == Image.id).where(RunImage.run_id == run_id)).all()
    return {int(p): (int(i), int(h), int(w), n, Path(path)) for p, i, h, w, n, path in rows}


def _heat_rgb(heat: np.ndarray) -> np.ndarray:
    """Similarity in [-1, 1] -> RGB (dark blue -> red -> yellow), uint8."""
    t = np.clip((np.asarray(heat, np.float32) + 0.1) / 1.1, 0.0, 1.0)[..., None]
    low, mid, high = np.array([20, 30, 90.0]), np.array([220, 40, 40.0]), np.array([255, 240, 80.0])
    rgb = np.where(t < 0.6, low + (mid - low) * (t / 0.6), mid + (high - mid) * ((t - 0.6) / 0.4))
    return rgb.astype(np.uint8)


def _overlay(rgb: np.ndarray, heat_full: np.ndarray, threshold: float, opacity: float = 0.6) -> np.ndarray:
    colour = _heat_rgb(heat_full).astype(np.float32)
    out = rgb.astype(np.float32) * (1 - opacity) + colour * opacity
    edge = heat_full >= threshold
    inner = edge.copy()
    inner[1:-1, 1:-1] = edge[1:-1, 1:-1] & edge[:-2, 1:-1] & edge[2:, 1:-1] & edge[1:-1, :-2] & edge[1:-1, 2:]
    out[edge & ~inner] = (255, 255, 255)          # outline of the region above the threshold
    return np.clip(out, 0, 255).astype(np.uint8)


def mark_cell(img: np.ndarray, cell: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """``img`` with the token ``cell`` of a ``grid`` over it framed (black, then white inside), so a
    person sees which token the click chose."""
    out = np.array(img, copy=True)
    H, W = out.shape[:2]
    (r, c), (h, w) = cell, grid
    y0, y1 = r * H // h, max(r * H // h + 1, (r + 1) * H // h)
    x0, x1 = c * W // w, max(c * W // w + 1, (c + 1) * W // w)
    for pad, colour in ((0, 0), (1, 255)):
        ya, yb, xa, xb = y0 + pad, y1 - 1 - pad, x0 + pad, x1 - 1 - pad
        if ya > yb or xa > xb:
            break
        out[ya, xa:xb + 1] = out[yb, xa:xb + 1] = colour
        out[ya:yb + 1, xa] = out[ya:yb + 1, xb] = colour
    return out


def cell_at(grid: tuple[int, int], size: tuple[int, int], x: float, y: float) -> tuple[int, int]:
    """The token cell under pixel (x, y) of an image shown at size (H, W)."""
    h, w = grid
    H, W = size
    if not (0 <= x < W and 0 <= y < H):
        raise UserError(f"the point ({x:.0f}, {y:.0f}) is outside the image ({W}x{H})")
    return min(h - 1, int(y * h / H)), min(w - 1, int(x * w / W))


def query(ctx, run_id: int, image_id: int, x: float, y: float, shown_size: tuple[int, int] | None = None,
          threshold: float = DEFAULT_THRESHOLD, n_matches: int = N_MATCHES, max_side: int | None = 1024,
          radius: int = 0) -> Correspondence:
    """How strongly every location corresponds to the point (x, y) of ``image_id``.

    (x, y) are pixels of the image as shown, ``shown_size`` (H, W) its displayed size
    (default: the stored image size).
    """
    if not -1.0 <= float(threshold) <= 1.0:
        raise UserError(f"the similarity threshold {threshold} must be between -1 and 1")
    run_dir, position, _name, path, (H, W) = _run_and_position(ctx, run_id, image_id)
    index = ensure_index(ctx, run_id)
    cell = cell_at(index.grid(position), shown_size or (H, W), x, y)
    sims = index.similarities(index.vector(position, *cell, radius=radius))
    rgb = load_rgb_fit(path, max_side, ctx.config.max_image_pixels)
    heat_full = index.upsampled_map(sims, position, rgb.shape[:2])
    sizes = _sizes(ctx, run_id)
    coverage = index.coverage(sims, float(threshold))
    matches = []
    for pos, best, _cell in index.best_items(sims, k=n_matches, exclude=position):
        if pos not in sizes:
            continue
        mid, _, _, mname, mpath = sizes[pos]
        try:
            thumb = load_rgb_fit(mpath, MATCH_SIZE, ctx.config.max_image_pixels)
        except UserError as exc:
            log.warning("match %s unavailable: %s", mid, exc)
            continue
        matches.append(Match(mid, mname, best, float(coverage[pos]),
                             _overlay(thumb, index.upsampled_map(sims, pos, thumb.shape[:2]), float(threshold))))
    areas = np.array([sizes[p][1] * sizes[p][2] if p in sizes else 0 for p in range(len(index))], np.float64)
    return Correspondence(run_id=run_id, image_id=image_id, cell=cell, grid=index.grid(position),
                          threshold=float(threshold), heat=index.item_map(sims, position).astype(np.float32),
                          overlay=mark_cell(_overlay(rgb, heat_full, float(threshold)), cell, index.grid(position)),
                          matches=tuple(matches),
                          corpus_share=float((coverage * areas).sum() / max(areas.sum(), 1.0)))


def _write_found(run_dir: Path, entries: list[dict]) -> None:
    rd = RunDir(run_dir)
    rd.found_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(rd.found_json, entries)


def create_cluster(ctx, run_id: int, image_id: int, cell: tuple[int, int], threshold: float = DEFAULT_THRESHOLD,
                   name: str | None = None, radius: int = 0) -> mapping.ClusterInfo:
    """Turn the region corresponding to ``cell`` of ``image_id`` (similarity >= threshold) into a
    new cluster; ``name`` names it (an existing label's name adds it to that label)."""
    if not -1.0 <= float(threshold) <= 1.0:
        raise UserError(f"the similarity threshold {threshold} must be between -1 and 1")
    run_dir, position, _, _, _ = _run_and_position(ctx, run_id, image_id)
    index = ensure_index(ctx, run_id)
    h, w = index.grid(position)
    cy, cx = (int(v) for v in cell)
    if not (0 <= cy < h and 0 <= cx < w):
        raise UserError(f"cell {cell} is outside the image's {h}x{w} token grid")
    sims = index.similarities(index.vector(position, cy, cx, radius=radius))
    coverage = index.coverage(sims, float(threshold))
    if not coverage.any():
        raise UserError("no location reaches that similarity; lower the threshold")
    sizes = _sizes(ctx, run_id)
    areas = np.array([sizes[p][1] * sizes[p][2] if p in sizes else 0 for p in range(len(index))], np.float64)
    pixels = coverage * areas
    with ctx.db.write() as s:
        run = lock_for_update(s, Run, run_id)
        existing = list(s.scalars(select(Cluster).where(Cluster.run_id == run_id)))
        new_index = max((c.index for c in existing), default=-1) + 1
        total = max(float(sum(c.pixels for c in existing)), 1.0)
        order = [int(p) for p in np.argsort(-coverage, kind="stable") if coverage[p] > 0 and p in sizes]
        used = {c.colour for c in existing}
        colour = next((palette_colour(new_index + j) for j in range(64)
                       if palette_colour(new_index + j) not in used), palette_colour(new_index))
        sims_path = RunDir(run_dir).found_sims(new_index)
        sims_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(sims_path, sims.astype(np.float16).tobytes())
        entries = segmaps.found_clusters(run_dir)
        entries.append({"index": new_index, "position": position, "image_id": int(image_id), "cell": [cy, cx],
                        "radius": int(radius), "threshold": float(threshold)})
        try:
            _write_found(run_dir, entries)
            s.add(Cluster(run_id=run_id, index=new_index, pixels=int(pixels.sum()),
                          share=float(pixels.sum() / total), centroid_ref=str(sims_path.relative_to(run_dir)),
                          examples=[sizes[p][0] for p in order[:N_EXAMPLES]], colour=colour, ignored=False))
            run.mapping_version += 1
            s.flush()
        except BaseException:
            _write_found(run_dir, [e for e in entries if e["index"] != new_index])
            sims_path.unlink(missing_ok=True)
            raise
    log.info("run %s: found cluster %s from image %s cell %s (threshold %.2f, %.1f%% of pixels)", run_id,
             new_index, image_id, (cy, cx), threshold, 100 * float(pixels.sum() / total))
    if name and name.strip():
        mapping.name_cluster(ctx, run_id, new_index, name)
    return next(c for c in mapping.list_clusters(ctx, run_id) if c.index == new_index)


def remove_cluster(ctx, run_id: int, cluster_index: int) -> list[mapping.ClusterInfo]:
    """Delete a found cluster: the maps underneath show again; a label left empty goes too."""
    run_dir = _run_dir(ctx, run_id)
    entries = segmaps.found_clusters(run_dir)
    if not any(int(e["index"]) == int(cluster_index) for e in entries):
        raise UserError(f"cluster {cluster_index} was not made by click-to-find; only those can be removed")
    with ctx.db.write() as s:
        run = lock_for_update(s, Run, run_id)
        edit_versions.check(run_id, run.mapping_version)      # a stale page's removal is refused
        row = s.scalars(select(Cluster).where(Cluster.run_id == run_id, Cluster.index == int(cluster_index))).first()
        label_id = row.label_id if row is not None else None
        if row is not None:
            s.delete(row)
            s.flush()
        if label_id is not None:
            mapping.prune_labels(s, run_id)          # its label goes unless corrections still use it
        run.mapping_version += 1
        _write_found(run_dir, [e for e in entries if int(e["index"]) != int(cluster_index)])
    RunDir(run_dir).found_sims(int(cluster_index)).unlink(missing_ok=True)
    return mapping.list_clusters(ctx, run_id)


def is_found(ctx, run_id: int, cluster_index: int) -> bool:
    return any(int(e["index"]) == int(cluster_index) for e in segmaps.found_clusters(_run_dir(ctx, run_id)))
