"""COCO building blocks for the export: pure functions, no database.

- masks -> compressed RLE (pycocotools), exact pixel-edge polygons, bbox, area;
- per-image annotation builders for the "stuff" style (one RLE per label) and the
  "instance" style (one polygon annotation per connected component);
- streaming writers for COCO instances JSON and COCO panoptic JSON (+ PNGs) that keep
  one image's data in memory at a time and produce byte-identical output for identical
  input (fixed key order, integer numbers except the .5 of hole bridges, no timestamps);
- panoptic PNG encoding (id = R + 256*G + 256**2*B) and plain label PNGs.

Coordinates follow COCO: pixel (row r, column c) covers the square [c, c+1] x [r, r+1],
so polygon vertices lie on pixel corners and bboxes are [x, y, width, height].
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- masks

def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Binary (H, W) mask -> COCO compressed RLE {"size": [h, w], "counts": str}."""
    m = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    rle = mask_utils.encode(m)
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list counts) -> (H, W) uint8 mask."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, list):
        obj = mask_utils.frPyObjects(rle, h, w)
    else:
        obj = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(obj)


def mask_bbox(mask: np.ndarray) -> list[int]:
    """Tight [x, y, width, height] of the true pixels; [0, 0, 0, 0] for an empty mask."""
    m = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return [0, 0, 0, 0]
    cols = np.flatnonzero(m.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _runs(cond: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of True along axis 1: (row, start, stop) arrays."""
    n = cond.shape[0]
    padded = np.zeros((n, cond.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = cond
    d = np.diff(padded, axis=1)
    r0, s = np.nonzero(d == 1)
    r1, e = np.nonzero(d == -1)
    # nonzero scans row-major, so starts and stops pair up in order.
    assert np.array_equal(r0, r1)
    return r0, s, e


def trace_loops(mask: np.ndarray, connectivity: int = 4) -> list[np.ndarray]:
    """Boundary loops of a binary mask along pixel edges.

    Returns a list of (K, 2) int64 arrays of corner vertices (x, y), closed implicitly,
    only at direction changes. The foreground lies on the right of the walking direction
    (image coordinates), so outer boundaries have positive shoelace area and hole
    boundaries negative. connectivity=4: pixels touching only at a corner get separate
    loops (background 8-connected); connectivity=8: one outer loop per 8-connected
    component, passing twice through such corners (holes are 4-connected background).
    """
    if connectivity not in (4, 8):
        raise ValueError("connectivity must be 4 or 8")
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    if h == 0 or w == 0 or not m.any():
        return []
    p = np.zeros((h + 2, w + 2), dtype=bool)
    p[1:-1, 1:-1] = m
    up = m & ~p[:-2, 1:-1]
    down = m & ~p[2:, 1:-1]
    left = m & ~p[1:-1, :-2]
    right = m & ~p[1:-1, 2:]

    sx, sy, ex, ey, dirs = [], [], [], [], []

    def add(x0, y0, x1, y1, d):
        sx.append(x0); sy.append(y0); ex.append(x1); ey.append(y1)
        dirs.append(np.full(x0.shape, d, dtype=np.int64))

    r, c0, c1 = _runs(up)            # top edges, walking +x
    add(c0, r, c1, r, 0)
    r, c0, c1 = _runs(down)          # bottom edges, walking -x
    add(c1, r + 1, c0, r + 1, 2)
    c, r0, r1 = _runs(right.T)       # right edges, walking +y
    add(c + 1, r0, c + 1, r1, 1)
    c, r0, r1 = _runs(left.T)        # left edges, walking -y
    add(c, r1, c, r0, 3)

    sx = np.concatenate(sx).astype(np.int64); sy = np.concatenate(sy).astype(np.int64)
    ex = np.concatenate(ex).astype(np.int64); ey = np.concatenate(ey).astype(np.int64)
    d = np.concatenate(dirs)
    stride = np.int64(w + 1)
    keys = (sy * stride + sx) * 4 + d
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    end_vertex = ey * stride + ex

    def lookup(k: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(sorted_keys, k)
        pos_c = np.minimum(pos, len(sorted_keys) - 1)
        found = sorted_keys[pos_c] == k
        return np.where(found, order[pos_c], -1)

    # Maximal straight runs alternate horizontal/vertical, so the next segment turns.
    # At a pinch vertex (two outgoing segments) turning right keeps to the same pixel
    # (4-connected), turning left crosses to the diagonal pixel (8-connected).
    first, second = ((d + 1) % 4, (d + 3) % 4) if connectivity == 4 else ((d + 3) % 4, (d + 1) % 4)
    nxt = lookup(end_vertex * 4 + first)
    missing = nxt < 0
    nxt[missing] = lookup(end_vertex[missing] * 4 + second[missing])
    if (nxt < 0).any():  # pragma: no cover - would be a bug in the edge construction
        raise RuntimeError("open boundary while tracing a mask")

    nxt_list = nxt.tolist()
    visited = bytearray(len(nxt_list))
    loops: list[np.ndarray] = []
    for start in range(len(nxt_list)):
        if visited[start]:
            continue
        idx = []
        i = start
        while not visited[i]:
            visited[i] = 1
            idx.append(i)
            i = nxt_list[i]
        ia = np.asarray(idx, dtype=np.int64)
        loops.append(np.stack([sx[ia], sy[ia]], axis=1))
    # Deterministic order: by first vertex (rotate each loop to its smallest (y, x)).
    out = []
    for loop in loops:
        k = int(np.lexsort((loop[:, 0], loop[:, 1]))[0])
        out.append(np.roll(loop, -k, axis=0))
    out.sort(key=lambda a: (int(a[0, 1]), int(a[0, 0])))
    return out


def _segments(loop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) vertices of each segment of a closed loop."""
    return loop, np.concatenate((loop[1:], loop[:1]))


def loop_area(loop: np.ndarray) -> int:
    """Signed area of a traced loop (positive: outer boundary, negative: hole)."""
    a, b = _segments(loop)
    return int((a[:, 0] * b[:, 1] - b[:, 0] * a[:, 1]).sum()) // 2


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Exact COCO polygons of a binary mask: one polygon per 8-connected component.

    Vertices are pixel corners, flattened [x0, y0, x1, y1, ...]. COCO polygons cannot
    have holes and pycocotools unions the polygons of an annotation, so each hole is
    joined to the boundary around it by a zero-width bridge along a pixel-centre row
    (its two bridge vertices have y = row + 0.5): the single polygon then rasterises
    (pycocotools, even-odd or non-zero filling) to exactly the component, holes included.
    """
    m = np.asarray(mask, dtype=bool)
    loops = trace_loops(m, connectivity=8)
    outer = [loop_area(lp) > 0 for lp in loops]
    holes = [i for i, is_outer in enumerate(outer) if not is_outer]
    if not holes:
        return [lp.reshape(-1).tolist() for lp in loops]
    h = m.shape[0]

    # Index of the downward vertical segments of every loop, by (x, top y); at one x
    # they do not overlap, so the segment covering a pixel edge is found by bisection.
    seg_loop, seg_idx, seg_x, seg_top, seg_bottom = [], [], [], [], []
    for li, lp in enumerate(loops):
        a, b = _segments(lp)
        down = np.flatnonzero((a[:, 0] == b[:, 0]) & (b[:, 1] > a[:, 1]))
        seg_loop.append(np.full(down.size, li)); seg_idx.append(down)
        seg_x.append(a[down, 0]); seg_top.append(a[down, 1]); seg_bottom.append(b[down, 1])
    sl, si = np.concatenate(seg_loop), np.concatenate(seg_idx)
    sx, sb = np.concatenate(seg_x), np.concatenate(seg_bottom)
    key = sx * (h + 1) + np.concatenate(seg_top)
    order = np.argsort(key, kind="stable")
    key, sl, si, sx, sb = key[order], sl[order], si[order], sx[order], sb[order]

    # splits[(loop, segment)] = [(y, kind, hole)]: kind 0 = a hole's own bridge start Q,
    # kind 1 = the landing point P of hole `hole`'s bridge.
    splits: dict[tuple[int, int], list[tuple[float, int, int]]] = {}
    bridge: dict[int, tuple[int, float, int]] = {}      # hole -> (x of Q, y, x of P)
    for hi in holes:
        a, b = _segments(loops[hi])
        mx = int(a[:, 0].max())
        up = np.flatnonzero((a[:, 0] == mx) & (b[:, 0] == mx) & (b[:, 1] < a[:, 1]))
        s = int(up[np.argmin(b[up, 1])])                  # topmost rightmost edge of the hole
        row = int(b[s, 1])
        run = m[row, mx:]
        x_hit = mx + (int(np.argmin(run)) if not run.all() else run.size)
        k = int(np.searchsorted(key, x_hit * (h + 1) + row, side="right")) - 1
        if k < 0 or sx[k] != x_hit or sb[k] <= row:  # pragma: no cover - a tracing bug
            raise RuntimeError("no boundary found to the right of a hole")
        target = (int(sl[k]), int(si[k]))
        y = row + 0.5
        splits.setdefault((hi, s), []).append((y, 0, hi))
        splits.setdefault(target, []).append((y, 1, hi))
        bridge[hi] = (mx, y, x_hit)

    def items(li: int) -> list[tuple]:
        """The loop's vertices with split points, in walking order."""
        lp = loops[li]
        a, b = _segments(lp)
        out: list[tuple] = []
        for s in range(len(lp)):
            out.append(("v", int(a[s, 0]), int(a[s, 1])))
            pts = splits.get((li, s))
            if pts:
                out.extend(("q", hi) if kind == 0 else ("p", hi)
                           for _, kind, hi in sorted(pts, reverse=bool(b[s, 1] < a[s, 1])))
        return out

    def hole_items(hi: int) -> list[tuple]:
        """A hole's walk from its bridge point Q back to Q."""
        its = items(hi)
        q = its.index(("q", hi))
        mx, y, _ = bridge[hi]
        return [("v", mx, y)] + its[q + 1:] + its[:q] + [("v", mx, y)]

    polygons: list[list[float]] = []
    for li in range(len(loops)):
        if not outer[li]:
            continue
        coords: list[float] = []
        stack = [(items(li), 0)]
        while stack:
            its, i = stack.pop()
            while i < len(its):
                it = its[i]
                i += 1
                if it[0] == "v":
                    coords.extend((it[1], it[2]))
                elif it[0] == "p":
                    _, y, x_hit = bridge[it[1]]
                    coords.extend((x_hit, y))
                    stack.append((its, i))
                    stack.append(([("v", x_hit, y)], 0))
                    stack.append((hole_items(it[1]), 0))
                    break
        polygons.append(coords)
    return polygons


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons the way pycocotools (and annToMask) does."""
    if not polygons:
        return np.zeros((height, width), dtype=np.uint8)
    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    return mask_utils.decode(mask_utils.merge(rles))


# ------------------------------------------------------------- per-image annotations

@dataclass(frozen=True)
class Segment:
    """One annotation of one image (before ids are assigned)."""

    category_id: int
    segmentation: Any          # RLE dict (iscrowd 1) or list of polygons (iscrowd 0)
    area: int
    bbox: list[int]
    iscrowd: int


def category_map(segments: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Cluster-id image -> category-id image via lut[cluster] (0 = not exported)."""
    seg = np.asarray(segments)
    if seg.size and int(seg.max()) >= len(lut):  # cluster ids the run did not list
        lut = np.concatenate([lut, np.zeros(int(seg.max()) + 1 - len(lut), lut.dtype)])
    return lut[seg]


def stuff_segments(cat_map: np.ndarray) -> Iterator[tuple[Segment, np.ndarray]]:
    """One crowd RLE per category present (ascending id); yields (segment, mask)."""
    for cid in np.unique(cat_map):
        if cid == 0:
            continue
        mask = cat_map == cid
        yield Segment(int(cid), encode_rle(mask), int(mask.sum()), mask_bbox(mask), 1), mask


def instance_segments(cat_map: np.ndarray, min_area: int) -> Iterator[tuple[Segment, tuple[slice, slice], np.ndarray]]:
    """One polygon annotation per 8-connected component with area >= min_area.

    Ordered by category id, then by the component's first pixel in raster order. Yields
    (segment, (row slice, column slice), component mask inside that slice).
    """
    for cid in np.unique(cat_map):
        if cid == 0:
            continue
        labels, n = ndimage.label(cat_map == cid, structure=_EIGHT)
        if n == 0:
            continue
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        for k, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None or areas[k] < max(min_area, 1):
                continue
            comp = labels[sl] == k
            y0, x0 = sl[0].start, sl[1].start
            polys = mask_to_polygons(comp)
            for p in polys:
                p[0::2] = [v + x0 for v in p[0::2]]
                p[1::2] = [v + y0 for v in p[1::2]]
            bbox = [int(x0), int(y0), int(sl[1].stop - x0), int(sl[0].stop - y0)]
            yield Segment(int(cid), polys, int(areas[k]), bbox, 0), sl, comp


# ----------------------------------------------------------------------- PNG output

def encode_panoptic(ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids (< 256**3) -> (H, W, 3) uint8 RGB with id = R + 256 G + 256^2 B."""
    a = np.asarray(ids, dtype=np.uint32)
    if a.size and int(a.max()) >= 256 ** 3:
        raise ValueError("panoptic segment id does not fit in 24 bits")
    return np.stack([a & 255, (a >> 8) & 255, (a >> 16) & 255], axis=-1).astype(np.uint8)


def decode_panoptic(rgb: np.ndarray) -> np.ndarray:
    """Inverse of encode_panoptic: (H, W, 3) RGB -> (H, W) uint32 ids."""
    a = np.asarray(rgb, dtype=np.uint32)
    return a[..., 0] + 256 * a[..., 1] + 256 * 256 * a[..., 2]


def write_png(path: Path, array: np.ndarray) -> None:
    """Write uint8 (L or RGB) or uint16 (I;16) array as PNG; deterministic bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.ascontiguousarray(array)
    if a.dtype == np.uint16:
        img = Image.fromarray(a, mode="I;16") if a.ndim == 2 else None
        if img is None:
            raise ValueError("16-bit PNGs must be single-channel")
    elif a.dtype == np.uint8:
        img = Image.fromarray(a)
    else:
        raise ValueError(f"unsupported PNG dtype {a.dtype}")
    img.save(path, format="PNG", optimize=False, compress_level=6)


def label_png_dtype(max_category_id: int) -> type:
    """uint8 when every category id fits, else uint16."""
    if max_category_id < 256:
        return np.uint8
    if max_category_id < 65536:
        return np.uint16
    raise ValueError("category ids above 65535 do not fit in a label PNG")


# ------------------------------------------------------------------- JSON streaming

def _dumps(obj: Any) -> str:
    """Compact, deterministic JSON (dict order is the caller's fixed order)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class _StreamingJson:
    """Write {head..., "images": [...], "annotations": [...]} without holding the lists.

    Images go straight into the target file; annotations into a sidecar temporary file
    that is appended when the writer closes. The file appears under its final name only
    after a successful close (written as <name>.partial first).
    """

    def __init__(self, path: Path, head: dict[str, Any]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + ".partial")
        # Both files stay open until close()/abort(), hence no `with`.
        self._main: IO[str] = open(self._partial, "w", encoding="utf-8", newline="\n")  # noqa: SIM115
        self._side: IO[str] = tempfile.TemporaryFile(  # noqa: SIM115
            "w+", encoding="utf-8", newline="\n", dir=self.path.parent)
        self._main.write("{")
        for key, value in head.items():
            self._main.write(f"{_dumps(key)}:{_dumps(value)},\n")
        self._main.write('"images":[')
        self.n_images = 0
        self.n_annotations = 0
        self._closed = False

    def _image(self, obj: dict[str, Any]) -> None:
        self._main.write(("\n" if self.n_images == 0 else ",\n") + _dumps(obj))
        self.n_images += 1

    def _annotation(self, obj: dict[str, Any]) -> None:
        self._side.write(("\n" if self.n_annotations == 0 else ",\n") + _dumps(obj))
        self.n_annotations += 1

    def close(self) -> None:
        """Finish the file and move it to its final name."""
        if self._closed:
            return
        self._main.write("\n],\n" if self.n_images else "],\n")
        self._main.write('"annotations":[')
        self._side.seek(0)
        shutil.copyfileobj(self._side, self._main, 1 << 20)
        self._main.write("\n]}\n" if self.n_annotations else "]}\n")
        self._side.close()
        self._main.close()
        os.replace(self._partial, self.path)
        self._closed = True

    def abort(self) -> None:
        """Drop the partial output."""
        if self._closed:
            return
        self._side.close()
        self._main.close()
        self._partial.unlink(missing_ok=True)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def image_entry(image_id: int, file_name: str, width: int, height: int) -> dict[str, Any]:
    """COCO image record in the fixed key order."""
    return {"id": int(image_id), "file_name": str(file_name), "width": int(width), "height": int(height)}


def category_entry(category_id: int, name: str, supercategory: str = "",
                   isthing: int | None = None, color: Sequence[int] | None = None) -> dict[str, Any]:
    """COCO category record; isthing/color only for panoptic."""
    entry: dict[str, Any] = {"id": int(category_id), "name": str(name), "supercategory": str(supercategory)}
    if isthing is not None:
        entry["isthing"] = int(isthing)
    if color is not None:
        entry["color"] = [int(v) for v in color]
    return entry


class CocoWriter(_StreamingJson):
    """Streaming COCO instances/stuff JSON: info, licenses, categories, images, annotations."""

    def __init__(self, path: Path, info: dict[str, Any], categories: Sequence[dict[str, Any]]):
        super().__init__(path, {"info": info, "licenses": [], "categories": list(categories)})

    def add_image(self, image: dict[str, Any]) -> None:
        self._image(image)

    def add_segment(self, image_id: int, seg: Segment) -> int:
        """Append one annotation; ids are 1, 2, ... in call order. Returns the id."""
        ann_id = self.n_annotations + 1
        self._annotation({"id": ann_id, "image_id": int(image_id), "category_id": seg.category_id,
                          "segmentation": seg.segmentation, "area": seg.area, "bbox": seg.bbox,
                          "iscrowd": seg.iscrowd})
        return ann_id


class PanopticWriter(_StreamingJson):
    """Streaming COCO panoptic: JSON + one RGB-encoded PNG per image in png_dir."""

    def __init__(self, path: Path, png_dir: Path, info: dict[str, Any],
                 categories: Sequence[dict[str, Any]]):
        super().__init__(path, {"info": info, "licenses": [], "categories": list(categories)})
        self.png_dir = Path(png_dir)
        self.png_dir.mkdir(parents=True, exist_ok=True)

    def add_image(self, image: dict[str, Any], png_name: str, segment_ids: np.ndarray,
                  segments_info: Sequence[dict[str, Any]]) -> None:
        """Write the image record, its panoptic PNG and its annotation record."""
        write_png(self.png_dir / png_name, encode_panoptic(segment_ids))
        self._image(image)
        self._annotation({"image_id": image["id"], "file_name": png_name,
                          "segments_info": list(segments_info)})


def panoptic_segment_info(segment_id: int, seg: Segment) -> dict[str, Any]:
    """segments_info entry (panoptic segments are never crowd here)."""
    return {"id": int(segment_id), "category_id": seg.category_id, "area": seg.area,
            "bbox": seg.bbox, "iscrowd": 0}


def unique_png_name(file_name: str, image_id: int, used: set[str]) -> str:
    """<stem>.png, or <stem>_<image_id>.png when that stem was already used."""
    stem = Path(file_name).stem or f"image_{image_id}"
    name = f"{stem}.png"
    if name in used:
        name = f"{stem}_{image_id}.png"
    used.add(name)
    return name
