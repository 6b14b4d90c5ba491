"""Naming discovered clusters: labels, merges, ignores, colours, overlays, seed annotations.

Labels belong to one run (name unique per run, case-insensitive). Each cluster is
either unnamed, mapped to exactly one label (several clusters -> one label = merged),
or ignored (void). Every edit is one write transaction that locks the run, re-reads
the current mapping, applies the edit, deletes labels left without clusters and
bumps Run.mapping_version, so concurrent edits from several tabs are serialised and
none is lost.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import delete, func, select

from stego_app.db import lock_for_update
from stego_app.errors import NotFound, UserError
from stego_app.models import RUN_DONE, Cluster, Image, Label, Run, RunImage, SeedAnnotation, utcnow
from stego_app.projects import clean_name
from stego_app.render import (IGNORED_COLOUR, blend, colourize, first_free_colour, hex_to_rgb,
                              highlight, normalise_hex, resize_nearest)
from stego_app.thumbnails import load_rgb_fit

log = logging.getLogger(__name__)

MAX_LABEL_NAME = 100
DISPLAY_MAX_SIDE = 1024          # render_segmentation's default size limit (long side, pixels)
MIN_DISPLAY_SIDE = 16
EXAMPLE_SUPERSAMPLE = 4          # segment map samples per thumbnail pixel and axis (soft edges)
EXAMPLE_CACHE_BYTES = 64 << 20   # memory for cached example thumbnails (per process)


@dataclass(frozen=True)
class ClusterInfo:
    index: int
    pixels: int
    share: float
    example_image_ids: tuple[int, ...]
    colour: str
    label_id: int | None
    label_name: str | None
    ignored: bool
    merged_with: tuple[int, ...]


@dataclass(frozen=True)
class LegendEntry:
    name: str
    colour: str
    share: float
    cluster_indices: tuple[int, ...]
    label_id: int | None
    ignored: bool


@dataclass(frozen=True)
class SegmentationView:
    image_id: int
    original: np.ndarray
    overlay: np.ndarray
    segmentation: np.ndarray
    legend: list[LegendEntry]
    crf: bool
    confirmed: bool


@dataclass(frozen=True)
class SeedAnnotationInfo:
    id: int
    run_id: int
    image_id: int
    label_id: int
    label_name: str
    colour: str
    rle: dict
    area: int
    bbox: tuple[int, int, int, int]
    crf: bool
    confirmed: bool


# ---------------------------------------------------------------- reading the mapping

@dataclass(frozen=True)
class _Mapping:
    """A snapshot of a run's clusters and labels (taken inside one transaction)."""

    run_id: int
    version: int
    run_dir: Path
    has_crf: bool
    crf_default: bool
    clusters: tuple[ClusterInfo, ...]
    labels: dict[int, tuple[str, str]]     # label id -> (name, colour)

    def colours(self) -> dict[int, str]:
        return {c.index: c.colour for c in self.clusters}

    def label_clusters(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = defaultdict(list)
        for c in self.clusters:
            if c.label_id is not None and not c.ignored:
                out[c.label_id].append(c.index)
        return dict(out)


def _get_run(s, run_id: int, lock: bool = False) -> Run:
    run = lock_for_update(s, Run, run_id) if lock else s.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id} does not exist")
    if run.status != RUN_DONE:
        raise UserError(f"run {run_id} is {run.status}; clusters can be named once it is done")
    return run


def _cluster_rows(s, run_id: int) -> list[Cluster]:
    return list(s.scalars(select(Cluster).where(Cluster.run_id == run_id).order_by(Cluster.index)))


def _display_colours(clusters: Sequence[Cluster], labels: dict[int, Label]) -> dict[int, str]:
    """Colour per cluster index: label colour, ignored grey, or a colour no label uses."""
    used = {lab.colour for lab in labels.values()}
    out: dict[int, str] = {}
    for c in clusters:
        if c.ignored:
            out[c.index] = IGNORED_COLOUR
        elif c.label_id is not None and c.label_id in labels:
            out[c.index] = labels[c.label_id].colour
    for c in clusters:
        if c.index in out:
            continue
        colour = c.colour if c.colour not in used else first_free_colour(used, start=c.index)
        out[c.index] = colour
        used.add(colour)
    return out


def _snapshot(s, run: Run) -> _Mapping:
    clusters = _cluster_rows(s, run.id)
    labels = {lab.id: lab for lab in s.scalars(select(Label).where(Label.run_id == run.id))}
    colours = _display_colours(clusters, labels)
    by_label: dict[int, list[int]] = defaultdict(list)
    for c in clusters:
        if c.label_id is not None:
            by_label[c.label_id].append(c.index)
    infos = tuple(
        ClusterInfo(index=c.index, pixels=c.pixels, share=c.share,
                    example_image_ids=tuple(int(i) for i in (c.examples or [])),
                    colour=colours[c.index], label_id=c.label_id,
                    label_name=labels[c.label_id].name if c.label_id in labels else None,
                    ignored=c.ignored,
                    merged_with=tuple(i for i in by_label.get(c.label_id, []) if i != c.index)
                    if c.label_id is not None else ())
        for c in clusters)
    run_dir = Path(run.run_dir)
    return _Mapping(run_id=run.id, version=run.mapping_version, run_dir=run_dir,
                    has_crf=(run_dir / "segments_crf").is_dir(),
                    crf_default=bool((run.params or {}).get("crf", True)),
                    clusters=infos, labels={k: (v.name, v.colour) for k, v in labels.items()})


def _read_mapping(ctx, run_id: int) -> _Mapping:
    with ctx.db.read() as s:
        return _snapshot(s, _get_run(s, run_id))


def list_clusters(ctx, run_id: int) -> list[ClusterInfo]:
    """The run's clusters in index order with their current mapping and colour."""
    return list(_read_mapping(ctx, run_id).clusters)


def _legend(mapping: _Mapping, shares: dict[int, float] | None = None) -> list[LegendEntry]:
    share = shares if shares is not None else {c.index: c.share for c in mapping.clusters}
    entries: list[LegendEntry] = []
    for label_id, (name, colour) in sorted(mapping.labels.items(), key=lambda kv: kv[1][0].lower()):
        idx = tuple(c.index for c in mapping.clusters if c.label_id == label_id and not c.ignored)
        if idx:
            entries.append(LegendEntry(name=name, colour=colour, share=sum(share.get(i, 0.0) for i in idx),
                                       cluster_indices=idx, label_id=label_id, ignored=False))
    for c in mapping.clusters:
        if c.label_id is None and not c.ignored:
            entries.append(LegendEntry(name=f"cluster {c.index}", colour=c.colour,
                                       share=share.get(c.index, 0.0), cluster_indices=(c.index,),
                                       label_id=None, ignored=False))
    ignored = tuple(c.index for c in mapping.clusters if c.ignored)
    if ignored:
        entries.append(LegendEntry(name="ignored", colour=IGNORED_COLOUR,
                                   share=sum(share.get(i, 0.0) for i in ignored),
                                   cluster_indices=ignored, label_id=None, ignored=True))
    return entries


def legend(ctx, run_id: int) -> list[LegendEntry]:
    """Labels (by name), then unnamed clusters, then one 'ignored' entry; shares over the corpus."""
    return _legend(_read_mapping(ctx, run_id))


# ---------------------------------------------------------------- edits

class _Edit:
    """One serialised edit of a run's mapping (a write transaction)."""

    def __init__(self, ctx, run_id: int):
        self.ctx, self.run_id = ctx, run_id
        # a label created by this edit, with the (old label id, own colour) of the clusters it took
        self._new_colour_for: tuple[Label, list[tuple[int | None, str]]] | None = None

    def __enter__(self):
        self._cm = self.ctx.db.write()
        self.s = self._cm.__enter__()
        try:
            self.run = _get_run(self.s, self.run_id, lock=True)
            self.clusters = {c.index: c for c in _cluster_rows(self.s, self.run_id)}
            self.labels = {lab.id: lab for lab in self.s.scalars(select(Label).where(Label.run_id == self.run_id))}
        except BaseException as exc:
            self._cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, et, ev, tb):
        return self._cm.__exit__(et, ev, tb)

    def cluster(self, index: int) -> Cluster:
        try:
            return self.clusters[int(index)]
        except (KeyError, ValueError, TypeError):
            raise NotFound(f"run {self.run_id} has no cluster {index} "
                           f"(clusters are 0..{len(self.clusters) - 1})") from None

    def label_named(self, name: str) -> Label | None:
        key = name.lower()
        return next((lab for lab in self.labels.values() if lab.name.lower() == key), None)

    def new_label(self, name: str, moved: Sequence[Cluster]) -> Label:
        lab = Label(run_id=self.run_id, name=name, colour="#000000")
        self.s.add(lab)
        self.s.flush()
        self.labels[lab.id] = lab
        self._new_colour_for = (lab, [(c.label_id, c.colour) for c in moved])
        return lab

    def assign(self, cluster: Cluster, label: Label | None) -> None:
        cluster.label_id = label.id if label is not None else None
        if label is not None:
            cluster.ignored = False

    def finish(self) -> list[ClusterInfo]:
        """Delete empty labels, colour a new label, bump the version, return the mapping."""
        self.s.flush()
        in_use = {c.label_id for c in self.clusters.values() if c.label_id is not None}
        emptied = [lab for lid, lab in self.labels.items() if lid not in in_use]
        pending = self._new_colour_for
        for lab in emptied:
            self.s.delete(lab)
            del self.labels[lab.id]
        if pending is not None:          # a new label: reuse a colour the person already saw
            lab, previous = pending
            taken = {other.colour for other in self.labels.values() if other.id != lab.id}
            emptied_colours = {e.id: e.colour for e in emptied}
            candidates = [emptied_colours[lid] for lid, _ in previous if lid in emptied_colours]
            candidates += [own for _, own in previous]
            unnamed = {c.colour for c in self.clusters.values() if c.label_id is None}
            lab.colour = next((c for c in candidates if c not in taken),
                              first_free_colour(taken | unnamed))
        self.run.mapping_version += 1
        self.s.flush()
        return list(_snapshot(self.s, self.run).clusters)


def name_cluster(ctx, run_id: int, cluster_index: int, name: str) -> list[ClusterInfo]:
    """Give a cluster a label. An existing label's name merges the cluster into that label;
    a cluster alone under its label renames the label (keeping its colour)."""
    name = clean_name(name, "label name", MAX_LABEL_NAME)
    with _Edit(ctx, run_id) as e:
        c = e.cluster(cluster_index)
        target = e.label_named(name)
        current = e.labels.get(c.label_id) if c.label_id is not None else None
        if target is not None:                           # the name typed last sets the capitalisation
            target.name = name
            e.assign(c, target)
        elif current is not None and all(o.label_id != current.id for o in e.clusters.values() if o is not c):
            current.name = name                          # alone under its label: rename it
        else:
            e.assign(c, e.new_label(name, [c]))
        return e.finish()


def rename_label(ctx, run_id: int, old_name: str, new_name: str) -> list[ClusterInfo]:
    """Rename a label; if the new name is another label's, the two labels are merged."""
    new_name = clean_name(new_name, "label name", MAX_LABEL_NAME)
    with _Edit(ctx, run_id) as e:
        label = e.label_named(" ".join((old_name or "").split()))
        if label is None:
            raise NotFound(f"run {run_id} has no label named {old_name!r}")
        target = e.label_named(new_name)
        if target is None or target.id == label.id:
            label.name = new_name
        else:
            target.name = new_name
            for c in e.clusters.values():
                if c.label_id == label.id:
                    e.assign(c, target)
        return e.finish()


def merge_clusters(ctx, run_id: int, cluster_indices: Sequence[int], name: str) -> list[ClusterInfo]:
    """Map all given clusters to one label `name` (existing or new)."""
    name = clean_name(name, "label name", MAX_LABEL_NAME)
    indices = list(dict.fromkeys(int(i) for i in cluster_indices))
    if not indices:
        raise UserError("choose at least one cluster to merge")
    with _Edit(ctx, run_id) as e:
        moved = [e.cluster(i) for i in indices]
        target = e.label_named(name)
        if target is None:
            target = e.new_label(name, moved)
        else:
            target.name = name
        for c in moved:
            e.assign(c, target)
        return e.finish()


def unmerge_cluster(ctx, run_id: int, cluster_index: int) -> list[ClusterInfo]:
    """Take a cluster out of its label: it is its own unnamed entry again."""
    with _Edit(ctx, run_id) as e:
        c = e.cluster(cluster_index)
        c.label_id = None
        c.ignored = False
        return e.finish()


def ignore_cluster(ctx, run_id: int, cluster_index: int, ignored: bool = True) -> list[ClusterInfo]:
    """Mark a cluster as void (its label is dropped) or bring it back as unnamed."""
    with _Edit(ctx, run_id) as e:
        c = e.cluster(cluster_index)
        if ignored:
            c.label_id = None
            c.ignored = True
        else:
            c.ignored = False
        return e.finish()


def set_label_colour(ctx, run_id: int, label_name: str, colour: str) -> list[ClusterInfo]:
    """Change a label's colour ("#rrggbb"); colours stay unique within the run."""
    try:
        colour = normalise_hex(colour)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if colour == IGNORED_COLOUR:
        raise UserError(f"{colour} is reserved for ignored clusters; choose another colour")
    with _Edit(ctx, run_id) as e:
        label = e.label_named(" ".join((label_name or "").split()))
        if label is None:
            raise NotFound(f"run {run_id} has no label named {label_name!r}")
        clash = next((lab for lab in e.labels.values() if lab.id != label.id and lab.colour == colour), None)
        if clash is not None:
            raise UserError(f"{colour} is already the colour of {clash.name!r}")
        label.colour = colour
        return e.finish()


# ---------------------------------------------------------------- segment maps and overlays

def _position(s, run_id: int, image_id: int) -> tuple[int, Image, bool]:
    row = s.execute(select(RunImage, Image).join(Image, RunImage.image_id == Image.id)
                    .where(RunImage.run_id == run_id, RunImage.image_id == image_id)).first()
    if row is None:
        raise NotFound(f"image {image_id} is not part of run {run_id}")
    ri, img = row
    return ri.position, img, ri.confirmed


def read_segments(run_dir: Path, position: int, crf: bool, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) int32 cluster ids of run item `position` (nearest-resized to size=(w, h) if given)."""
    path = run_dir / ("segments_crf" if crf else "segments") / f"{position:06d}.png"
    if not path.is_file():
        raise UserError(f"the segment map {path.name} of this run is missing ({path.parent})")
    with PILImage.open(path) as im:
        if size is not None and im.size != size:
            im = im.resize(size, PILImage.NEAREST)
        return np.asarray(im).astype(np.int32)


def render_segmentation(ctx, run_id: int, image_id: int, crf: bool = False, opacity: float = 0.5,
                        hidden: Collection[int] = (), max_side: int | None = DISPLAY_MAX_SIDE) -> SegmentationView:
    """The image, its coloured overlay (hidden clusters left uncoloured) and its legend.

    `max_side` limits the long side of `original`, `overlay` and `segmentation` (the photo
    is area-downscaled, the cluster map resampled by nearest pixel); None = full size.
    Legend shares are always counted on the full-size segment map.
    """
    if max_side is not None and (isinstance(max_side, bool) or int(max_side) < MIN_DISPLAY_SIDE):
        raise UserError(f"the display size {max_side!r} must be at least {MIN_DISPLAY_SIDE} pixels")
    with ctx.db.read() as s:
        mapping = _snapshot(s, _get_run(s, run_id))
        position, img, confirmed = _position(s, run_id, image_id)
        path = Path(img.path)
    if not path.is_file():
        raise UserError(f"the file of image {img.name} is missing: {path}")
    original = load_rgb_fit(path, None if max_side is None else int(max_side), ctx.config.max_image_pixels)
    h, w = original.shape[:2]
    use_crf = bool(crf and mapping.has_crf)
    full = read_segments(mapping.run_dir, position, use_crf)
    counts = np.bincount(full.ravel(), minlength=max(len(mapping.clusters), int(full.max()) + 1))
    shares = {i: float(n) / full.size for i, n in enumerate(counts) if n}
    seg = resize_nearest(full, (h, w))
    colour_img = colourize(seg, {k: hex_to_rgb(v) for k, v in mapping.colours().items()})
    mask = ~np.isin(seg, np.fromiter((int(i) for i in hidden), dtype=np.int32)) if hidden else None
    overlay = blend(original, colour_img, mask, opacity)
    entries = [e for e in _legend(mapping, shares) if e.share > 0]
    return SegmentationView(image_id=image_id, original=original, overlay=overlay, segmentation=seg,
                            legend=entries, crf=use_crf, confirmed=confirmed)


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


def _example_base(run_dir: Path, position: int, path: Path, size: int,
                  max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """(photo with long side <= size, raw cluster map at EXAMPLE_SUPERSAMPLE x its size)."""
    seg_path = run_dir / "segments" / f"{position:06d}.png"
    try:
        seg_stat, img_stat = seg_path.stat(), path.stat()
    except OSError as exc:
        raise UserError(f"a file of example item {position} is missing: {exc.filename}") from None
    key = (str(seg_path), seg_stat.st_mtime_ns, seg_stat.st_size,
           str(path), img_stat.st_mtime_ns, img_stat.st_size, size)
    cached = _EXAMPLE_CACHE.get(key)
    if cached is not None:
        return cached  # type: ignore[return-value]
    rgb = load_rgb_fit(path, size, max_pixels)
    h, w = rgb.shape[:2]
    full = read_segments(run_dir, position, False)
    seg = resize_nearest(full, (h * EXAMPLE_SUPERSAMPLE, w * EXAMPLE_SUPERSAMPLE))
    seg = seg.astype(np.uint8 if int(seg.max(initial=0)) < 256 else np.uint16)
    _EXAMPLE_CACHE.put(key, (rgb, seg))
    return rgb, seg


def cluster_examples(ctx, run_id: int, cluster_index: int, n: int = 4,
                     size: int = 192) -> list[tuple[int, np.ndarray]]:
    """Thumbnails of the cluster's best example images, the cluster tinted, the rest dimmed.

    The downscaled images are cached per process, so after a name/merge/colour edit only
    the tint is redone (milliseconds, not a decode of every example photo).
    """
    if isinstance(size, bool) or int(size) < MIN_DISPLAY_SIDE:
        raise UserError(f"the thumbnail size {size!r} must be at least {MIN_DISPLAY_SIDE} pixels")
    with ctx.db.read() as s:
        mapping = _snapshot(s, _get_run(s, run_id))
        cluster = next((c for c in mapping.clusters if c.index == cluster_index), None)
        if cluster is None:
            raise NotFound(f"run {run_id} has no cluster {cluster_index}")
        items = []
        for image_id in cluster.example_image_ids[:max(0, n)]:
            position, img, _ = _position(s, run_id, image_id)
            items.append((image_id, position, Path(img.path)))
    out = []
    k = EXAMPLE_SUPERSAMPLE
    for image_id, position, path in items:
        try:
            rgb, seg = _example_base(mapping.run_dir, position, path, int(size), ctx.config.max_image_pixels)
        except (UserError, OSError) as exc:
            log.warning("example image %s of cluster %s unavailable: %s", image_id, cluster_index, exc)
            continue
        h, w = rgb.shape[:2]
        coverage = (seg == cluster_index).reshape(h, k, w, k).mean(axis=(1, 3))
        out.append((image_id, highlight(rgb, coverage, cluster.colour)))
    return out


# ---------------------------------------------------------------- seed annotations

def _encode(mask: np.ndarray) -> tuple[dict, int, tuple[int, int, int, int]]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    area = int(mask_utils.area(rle))
    bbox = tuple(int(round(v)) for v in mask_utils.toBbox(rle))
    counts = rle["counts"]
    return ({"size": [int(x) for x in rle["size"]],
             "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}, area, bbox)  # type: ignore[return-value]


def _compute_image(mapping: _Mapping, position: int, size: tuple[int, int], crf: bool
                   ) -> list[tuple[int, dict, int, tuple[int, int, int, int]]]:
    seg = read_segments(mapping.run_dir, position, crf, size=size)
    out = []
    for label_id, indices in sorted(mapping.label_clusters().items()):
        mask = np.isin(seg, np.asarray(indices, dtype=np.int32))
        if mask.any():
            rle, area, bbox = _encode(mask)
            out.append((label_id, rle, area, bbox))
    return out


def seed_annotations(ctx, run_id: int, image_ids: Sequence[int] | None = None, crf: bool | None = None,
                     confirmed_only: bool = False) -> list[SeedAnnotationInfo]:
    """One COCO-RLE mask per (image, label) present, matching the run's current mapping.

    Stale rows (another mapping version or CRF setting) are recomputed from the segment
    maps and stored; unnamed and ignored clusters give no annotation.
    """
    for _attempt in range(5):
        with ctx.db.read() as s:
            mapping = _snapshot(s, _get_run(s, run_id))
            use_crf = bool((mapping.crf_default if crf is None else crf) and mapping.has_crf)
            q = (select(RunImage.position, RunImage.image_id, RunImage.confirmed, Image.width, Image.height)
                 .join(Image, RunImage.image_id == Image.id).where(RunImage.run_id == run_id))
            if image_ids is not None:
                wanted = [int(i) for i in image_ids]
                q = q.where(RunImage.image_id.in_(wanted))
            if confirmed_only:
                q = q.where(RunImage.confirmed.is_(True))
            items = s.execute(q.order_by(RunImage.position)).all()
            if image_ids is not None:
                found = {it.image_id for it in items}
                missing = [i for i in wanted if i not in found]
                if missing and not confirmed_only:
                    raise NotFound(f"image {missing[0]} is not part of run {run_id}")
            fresh: set[int] = set()
            if items:
                rows = s.execute(select(SeedAnnotation.image_id, SeedAnnotation.mapping_version,
                                        SeedAnnotation.crf)
                                 .where(SeedAnnotation.run_id == run_id,
                                        SeedAnnotation.image_id.in_([it.image_id for it in items]))).all()
                state: dict[int, bool] = {}
                for image_id, version, row_crf in rows:
                    ok = version == mapping.version and row_crf == use_crf
                    state[image_id] = state.get(image_id, True) and ok
                fresh = {i for i, ok in state.items() if ok}
        stale = [it for it in items if it.image_id not in fresh]
        if mapping.label_clusters():
            computed = {it.image_id: _compute_image(mapping, it.position, (it.width, it.height), use_crf)
                        for it in stale}
        else:
            computed = {it.image_id: [] for it in stale}
        if not stale:
            break
        with ctx.db.write() as s:
            run = lock_for_update(s, Run, run_id)
            if run is None or run.mapping_version != mapping.version:
                continue            # the mapping changed meanwhile: compute again
            confirmed = {ri.image_id: ri.confirmed for ri in s.scalars(
                select(RunImage).where(RunImage.run_id == run_id,
                                       RunImage.image_id.in_(list(computed))))}
            s.execute(delete(SeedAnnotation).where(SeedAnnotation.run_id == run_id,
                                                   SeedAnnotation.image_id.in_(list(computed))))
            for image_id, anns in computed.items():
                for label_id, rle, area, bbox in anns:
                    s.add(SeedAnnotation(run_id=run_id, image_id=image_id, label_id=label_id, rle=rle,
                                         area=area, bbox=list(bbox), crf=use_crf,
                                         mapping_version=mapping.version,
                                         confirmed=confirmed.get(image_id, False)))
        break
    else:
        raise UserError("the labels of this run keep changing; try again")
    with ctx.db.read() as s:
        q = (select(SeedAnnotation, Label).join(Label, SeedAnnotation.label_id == Label.id)
             .where(SeedAnnotation.run_id == run_id,
                    SeedAnnotation.image_id.in_([it.image_id for it in items]))
             .order_by(SeedAnnotation.image_id, Label.name))
        if confirmed_only:
            q = q.where(SeedAnnotation.confirmed.is_(True))
        return [SeedAnnotationInfo(id=a.id, run_id=a.run_id, image_id=a.image_id, label_id=a.label_id,
                                   label_name=lab.name, colour=lab.colour, rle=dict(a.rle), area=a.area,
                                   bbox=tuple(a.bbox), crf=a.crf, confirmed=a.confirmed)  # type: ignore[arg-type]
                for a, lab in s.execute(q).all()]


def confirm_image(ctx, run_id: int, image_id: int, confirmed: bool = True) -> None:
    """Record that a person checked (or un-checked) this image's segmentation in this run."""
    with ctx.db.write() as s:
        _get_run(s, run_id, lock=True)
        ri = s.scalars(select(RunImage).where(RunImage.run_id == run_id,
                                              RunImage.image_id == image_id)).first()
        if ri is None:
            raise NotFound(f"image {image_id} is not part of run {run_id}")
        ri.confirmed = bool(confirmed)
        ri.confirmed_at = utcnow() if confirmed else None
        for ann in s.scalars(select(SeedAnnotation).where(SeedAnnotation.run_id == run_id,
                                                          SeedAnnotation.image_id == image_id)):
            ann.confirmed = bool(confirmed)
    if confirmed:
        seed_annotations(ctx, run_id, [image_id])


def confirmed_count(ctx, run_id: int) -> int:
    with ctx.db.read() as s:
        return s.scalar(select(func.count()).select_from(RunImage).where(
            RunImage.run_id == run_id, RunImage.confirmed.is_(True))) or 0

