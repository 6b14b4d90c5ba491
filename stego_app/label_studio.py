"""Label Studio import files: tasks with predictions and the matching labelling config.

- `brush_rle` / `decode_brush_rle`: masks in Label Studio's brush RLE (the rle-pack bit
  stream its editor decodes: a 32-bit value count, 5 bits word size - 1, four 4-bit run
  length sizes - 1, then chunks of [1 bit repeat flag, 2 bits size index, length - 1,
  word(s)]) over the mask as an RGBA image (every channel 255 inside, 0 outside);
- `brush_result` / `polygon_results`: prediction results (`brushlabels`, `polygonlabels`
  with points in percent of the image size);
- `label_config`: the `<View>` XML with the label names and colours;
- `TasksWriter`: streams tasks.json (a list of tasks), one image at a time;
- `tasks_to_coco`: the way back, Label Studio's JSON export (corrected annotations) as COCO.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, quote, unquote, urlparse
from xml.sax.saxutils import quoteattr

import numpy as np

from stego_app.coco import _dumps, encode_rle, polygons_to_mask

REGION_KINDS = ("brush", "polygons")
FROM_NAME = {"brush": "brush", "polygons": "polygon"}   # tag names in the labelling config
TO_NAME = "image"
DEFAULT_IMAGE_PREFIX = "/data/local-files/?d=images/"
WORD_SIZE = 8
RLE_SIZES = (3, 4, 8, 16)               # bits for a run length - 1, as Label Studio encodes


class _Bits:
    """MSB-first bit writer."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.acc = 0
        self.n = 0

    def write(self, value: int, bits: int) -> None:
        self.acc = (self.acc << bits) | (value & ((1 << bits) - 1))
        self.n += bits
        while self.n >= 8:
            self.n -= 8
            self.out.append((self.acc >> self.n) & 0xFF)
        self.acc &= (1 << self.n) - 1

    def bytes(self) -> list[int]:
        tail = [(self.acc << (8 - self.n)) & 0xFF] if self.n else []
        return list(self.out) + tail


def brush_rle(mask: np.ndarray) -> list[int]:
    """(H, W) mask -> Label Studio brush RLE (list of bytes)."""
    flat = np.repeat(np.asarray(mask, dtype=bool).ravel(), 4)
    values = np.where(flat, 255, 0).astype(np.uint8)
    bits = _Bits()
    bits.write(values.size, 32)
    bits.write(WORD_SIZE - 1, 5)
    for size in RLE_SIZES:
        bits.write(size - 1, 4)
    if values.size:
        change = np.flatnonzero(np.diff(values)) + 1
        starts = np.concatenate(([0], change))
        lengths = np.diff(np.concatenate((starts, [values.size])))
        longest = 1 << RLE_SIZES[-1]
        for start, length in zip(starts.tolist(), lengths.tolist()):
            value = int(values[start])
            while length > 0:
                n = min(length, longest)
                t = next(i for i, size in enumerate(RLE_SIZES) if n - 1 < (1 << size))
                bits.write(1, 1)                 # a repeated run
                bits.write(t, 2)
                bits.write(n - 1, RLE_SIZES[t])
                bits.write(value, WORD_SIZE)
                length -= n
    return bits.bytes()


def decode_brush_rle(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE -> (H, W) bool mask (alpha channel > 0)."""
    data = bytes(int(v) for v in rle)
    pos = 0

    def read(bits: int) -> int:
        nonlocal pos
        value = 0
        for _ in range(bits):
            byte = data[pos >> 3]
            value = (value << 1) | ((byte >> (7 - (pos & 7))) & 1)
            pos += 1
        return value

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, dtype=np.uint32)
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if repeat:
            out[i:j] = read(word)
        else:
            for k in range(i, j):
                out[k] = read(word)
        i = j
    if num != height * width * 4:
        raise ValueError(f"brush RLE holds {num} values, not {height}x{width}x4")
    return out.reshape(height, width, 4)[:, :, 3] > 0


def image_url(prefix: str, file_name: str) -> str:
    """The task's image URL: prefix + the export's file name, URL-quoted."""
    return f"{prefix}{quote(file_name, safe='/')}"


def url_file_path(url: str) -> str:
    """The file a task's image URL points at: the ``d`` of a local-files URL (``images/a/b.png``),
    else the URL's path (``/data/upload/3/5e1a2b3c-b.png``)."""
    parsed = urlparse(url)
    local = parse_qs(parsed.query).get("d")
    return local[-1] if local else unquote(parsed.path)


def copied_file_name(url: str) -> str:
    """The name Label Studio gives a task's local file when its COCO / YOLO export copies it into
    images/: the first 8 hex digits of the URL's MD5, two underscores, the file's own name."""
    return (hashlib.md5(url.encode(), usedforsecurity=False).hexdigest()[:8] + "__"
            + os.path.basename(url_file_path(url)))


def brush_result(result_id: str, name: str, mask: np.ndarray) -> dict[str, Any]:
    h, w = mask.shape
    return {"id": result_id, "type": "brushlabels", "from_name": FROM_NAME["brush"], "to_name": TO_NAME,
            "original_width": int(w), "original_height": int(h), "image_rotation": 0,
            "value": {"format": "rle", "rle": brush_rle(mask), "brushlabels": [name]}}


def _percent(v: int, size: int) -> float:
    return round(100.0 * v / size, 6)


def polygon_results(result_id: str, name: str, polygons: Sequence[Sequence[int]],
                    width: int, height: int) -> list[dict[str, Any]]:
    """One polygonlabels result per COCO polygon (flat pixel coordinates)."""
    out = []
    for k, poly in enumerate(polygons):
        points = [[_percent(poly[i], width), _percent(poly[i + 1], height)] for i in range(0, len(poly), 2)]
        out.append({"id": f"{result_id}p{k}", "type": "polygonlabels", "from_name": FROM_NAME["polygons"],
                    "to_name": TO_NAME, "original_width": int(width), "original_height": int(height),
                    "image_rotation": 0,
                    "value": {"points": points, "closed": True, "polygonlabels": [name]}})
    return out


def label_config(categories: Sequence[tuple[str, str]], regions: str) -> str:
    """Labelling config XML for (name, '#rrggbb') categories and brush or polygon regions."""
    tag = {"brush": "BrushLabels", "polygons": "PolygonLabels"}[regions]
    lines = ["<View>", f'  <Image name="{TO_NAME}" value="$image" zoom="true" zoomControl="true"/>',
             f'  <{tag} name="{FROM_NAME[regions]}" toName="{TO_NAME}">']
    lines += [f"    <Label value={quoteattr(name)} background={quoteattr(colour)}/>" for name, colour in categories]
    lines += [f"  </{tag}>", "</View>", ""]
    return "\n".join(lines)


class TasksWriter:
    """tasks.json: a JSON list of tasks, streamed; appears under its name only when closed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._f: IO[str] = open(self._partial, "w", encoding="utf-8", newline="\n")  # noqa: SIM115
        self._f.write("[")
        self.n = 0

    def add(self, image: str, image_id: int, file_name: str, model_version: str,
            results: list[dict[str, Any]]) -> None:
        task = {"data": {"image": image, "image_id": int(image_id), "file_name": file_name},
                "predictions": [{"model_version": model_version, "result": results}]}
        self._f.write(("\n" if self.n == 0 else ",\n") + _dumps(task))
        self.n += 1

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.write("\n]\n" if self.n else "]\n")
        self._f.close()
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._partial.unlink(missing_ok=True)


# ---------------------------------------------------------------- reading Label Studio's JSON export

REGION_TYPES = ("brushlabels", "polygonlabels", "rectanglelabels")


def is_tasks_export(data: Any) -> bool:
    """Label Studio's JSON export: a list of tasks, each with 'data' and 'annotations'."""
    return (isinstance(data, list) and bool(data) and all(isinstance(t, dict) for t in data[:10])
            and any("annotations" in t and isinstance(t.get("data"), dict) for t in data[:10]))


def task_file_name(data: dict[str, Any]) -> str:
    """The image path a task points at (``url_file_path`` of its 'image' field, else of its first string)."""
    url = data.get("image") if isinstance(data.get("image"), str) else next(
        (v for v in data.values() if isinstance(v, str)), "")
    return url_file_path(url)


def _latest_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    done = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    return max(done, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0),
               default=None)


def _region_mask(result: dict[str, Any], height: int, width: int) -> np.ndarray:
    value, kind = result["value"], result["type"]
    if kind == "brushlabels":
        if value.get("format", "rle") != "rle":
            raise ValueError(f"brush format {value.get('format')!r}")
        return decode_brush_rle(value["rle"], height, width)
    if kind == "polygonlabels":
        flat = [c for x, y in value["points"] for c in (float(x) * width / 100.0, float(y) * height / 100.0)]
        return polygons_to_mask([flat], height, width).astype(bool)
    if float(value.get("rotation") or 0) != 0:
        raise ValueError("rotated rectangle")
    x0, y0 = float(value["x"]) * width / 100.0, float(value["y"]) * height / 100.0
    x1, y1 = x0 + float(value["width"]) * width / 100.0, y0 + float(value["height"]) * height / 100.0
    box = [x0, y0, x1, y0, x1, y1, x0, y1]
    return polygons_to_mask([box], height, width).astype(bool)


def tasks_to_coco(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """Label Studio's JSON export -> a COCO instances dict (RLE masks) of each task's latest
    annotation that was not cancelled: brush, polygon and unrotated rectangle regions; predictions
    (the pre-labels) are not read. A region it cannot read gets a segmentation of None."""
    images, annotations, categories = [], [], {}
    for n, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            continue
        ann = _latest_annotation(task)
        results = [r for r in (ann or {}).get("result") or []
                   if isinstance(r, dict) and r.get("type") in REGION_TYPES and isinstance(r.get("value"), dict)]
        size = next(((int(r["original_width"]), int(r["original_height"])) for r in results
                     if "original_width" in r and "original_height" in r), (None, None))
        images.append({"id": n, "file_name": task_file_name(task["data"]), "width": size[0], "height": size[1]})
        for r in results:
            names = r["value"].get(r["type"]) or []
            if not names or size[0] is None:
                continue
            cat = categories.setdefault(str(names[0]), len(categories) + 1)
            try:
                m = _region_mask(r, size[1], size[0])
                seg, area = encode_rle(m), int(m.sum())
            except (KeyError, ValueError, TypeError, IndexError):
                seg, area = None, 0
            annotations.append({"id": len(annotations) + 1, "image_id": n, "category_id": cat,
                                "segmentation": seg, "area": area, "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": name} for name, i in categories.items()]}
