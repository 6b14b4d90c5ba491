"""From a run's label mapping to category maps and masks: the one path both seed
annotations (stego_app.labels) and exports (stego_app.export) take.

- `plan_categories`: the mapping (clusters -> labels, ignored, unnamed) as categories
  with stable ids (the label's database id), names, colours, thing/stuff, and the
  lookup table cluster index -> category id (0 = void);
- `category_map`: a cluster-id segment map -> a category-id map through that table;
- `label_masks`: one mask per category present (semantic);
- `regions`: what an export annotates: a thing label gives one region per 8-connected
  component of at least `min_area` pixels, a stuff label one region per image;
- `rle_area_bbox`: a mask as COCO RLE with its area and tight box.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from stego_app import coco
from stego_app.errors import UserError
from stego_app.label_kinds import guess_isthing

UNNAMED_CATEGORY_BASE = 60000          # + cluster index; keeps ids of unnamed clusters apart
EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class ClusterEntry:
    """One cluster of a run's mapping, as the plan needs it."""

    index: int
    label_id: int | None
    label_name: str | None
    label_colour: str | None
    label_isthing: bool | None       # a person's choice; None = guessed from the name
    ignored: bool
    colour: str                      # the cluster's own colour (used while unnamed)


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    colour: str                      # '#rrggbb'
    isthing: bool


@dataclass(frozen=True)
class CategoryPlan:
    """Categories sorted by id plus the lookup table cluster index -> category id (0 = void)."""

    categories: tuple[Category, ...]
    lut: np.ndarray                  # int32, len = max cluster index + 1

    @property
    def things(self) -> frozenset[int]:
        return frozenset(c.id for c in self.categories if c.isthing)

    def get(self, category_id: int) -> Category:
        return next(c for c in self.categories if c.id == category_id)


def plan_categories(clusters: Sequence[ClusterEntry], include_unnamed: bool = False) -> CategoryPlan:
    """Merged clusters share their label's id; ignored clusters are void; unnamed ones are void
    unless include_unnamed (then category 'cluster N', id UNNAMED_CATEGORY_BASE + N, stuff)."""
    found: dict[int, Category] = {}
    lut = np.zeros(max((c.index for c in clusters), default=-1) + 1, dtype=np.int32)
    label_ids = {c.label_id for c in clusters if c.label_id is not None}
    for c in clusters:
        if c.ignored:
            continue
        if c.label_id is not None:
            name = c.label_name or f"label {c.label_id}"
            isthing = c.label_isthing if c.label_isthing is not None else guess_isthing(name)
            cat = Category(c.label_id, name, c.label_colour or c.colour, bool(isthing))
        elif include_unnamed:
            cat = Category(UNNAMED_CATEGORY_BASE + c.index, f"cluster {c.index}", c.colour, False)
            if cat.id in label_ids:
                raise UserError("label ids of this database collide with the ids reserved for unnamed "
                                "clusters; name the clusters instead of including unnamed ones")
        else:
            continue
        lut[c.index] = cat.id
        found[cat.id] = cat
    return CategoryPlan(categories=tuple(found[k] for k in sorted(found)), lut=lut)


def category_map(segments: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Cluster-id image -> category-id image via lut[cluster] (0 = not exported)."""
    seg = np.asarray(segments)
    if seg.size and int(seg.max()) >= len(lut):  # cluster ids the run did not list
        lut = np.concatenate([lut, np.zeros(int(seg.max()) + 1 - len(lut), lut.dtype)])
    return lut[seg]


def label_masks(cat_map: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(category id, bool mask) for each category present, ascending id."""
    for cid in np.unique(cat_map):
        if cid != 0:
            yield int(cid), cat_map == cid


def rle_area_bbox(mask: np.ndarray) -> tuple[dict[str, Any], int, list[int]]:
    """Compressed COCO RLE, pixel count and tight [x, y, w, h] of a mask."""
    m = np.asarray(mask, dtype=bool)
    return coco.encode_rle(m), int(m.sum()), coco.mask_bbox(m)


@dataclass(frozen=True)
class Region:
    """One exported object (thing component) or region (stuff label) of one image."""

    category_id: int
    isthing: bool
    rows: slice
    cols: slice
    mask: np.ndarray                 # bool, the region inside [rows, cols]
    area: int

    @property
    def bbox(self) -> list[int]:
        return [int(self.cols.start), int(self.rows.start),
                int(self.cols.stop - self.cols.start), int(self.rows.stop - self.rows.start)]

    def full_mask(self, shape: tuple[int, int]) -> np.ndarray:
        out = np.zeros(shape, dtype=bool)
        out[self.rows, self.cols] = self.mask
        return out


def regions(cat_map: np.ndarray, things: frozenset[int] | set[int], min_area: int) -> Iterator[Region]:
    """Regions by category id; a thing's components in raster order of their first pixel.

    Thing components below min_area pixels are left out (void); stuff keeps every pixel.
    """
    for cid, mask in label_masks(cat_map):
        if cid not in things:
            [sl] = ndimage.find_objects(mask.astype(np.int8))
            yield Region(cid, False, sl[0], sl[1], mask[sl], int(mask.sum()))
            continue
        labels, n = ndimage.label(mask, structure=EIGHT)
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        for k, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None or areas[k] < max(min_area, 1):
                continue
            yield Region(cid, True, sl[0], sl[1], labels[sl] == k, int(areas[k]))
