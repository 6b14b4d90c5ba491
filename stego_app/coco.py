"""COCO building blocks for the export: pure functions, no database.

- masks -> compressed RLE (pycocotools), bbox; rasterising polygons as pycocotools does
  (the polygons themselves come from stego_app.polygons, the regions from stego_app.masks);
- streaming writers for COCO instances JSON and COCO panoptic JSON (+ PNGs) that keep
  one image's data in memory at a time and produce byte-identical output for identical
  input (fixed key order, integer coordinates, no timestamps);
- panoptic PNG encoding (id = R + 256*G + 256**2*B) and plain label PNGs.

Coordinates follow COCO: pixel (row r, column c) covers the square [c, c+1] x [r, r+1],
so exact polygon vertices lie on pixel corners and bboxes are [x, y, width, height].
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


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


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterise the polygons of one annotation the way pycocotools (annToMask) does."""
    if not polygons:
        return np.zeros((height, width), dtype=np.uint8)
    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    return mask_utils.decode(mask_utils.merge(rles))


# ------------------------------------------------------------- per-image annotations

@dataclass(frozen=True)
class Segment:
    """One annotation of one image (before ids are assigned)."""

    category_id: int
    segmentation: Any          # RLE dict or list of polygons
    area: int
    bbox: list[int]
    iscrowd: int


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
