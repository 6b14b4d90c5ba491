"""Import every export with Datumaro (PyPI or CVAT's fork) and compare its masks with pycocotools.

Usage: python check_datumaro.py EXPORTS_JSON  -> prints one JSON object.
"""
import json
import sys
from collections import defaultdict

import numpy as np
from pycocotools import mask as mu
from pycocotools.coco import COCO

from datumaro.components.annotation import AnnotationType
from datumaro.components.dataset import Dataset


def raster(ann, h, w):
    if ann.type == AnnotationType.polygon:
        return mu.decode(mu.merge(mu.frPyObjects([list(map(float, ann.points))], h, w))).astype(bool)
    if ann.type == AnnotationType.mask:
        return np.asarray(ann.image).astype(bool)
    return None


def check(path, has_images, has_panoptic):
    out = {}
    ds = Dataset.import_from(path, "coco_instances")
    cats = ds.categories()[AnnotationType.label]
    names = [c.name for c in cats.items]
    api = COCO(f"{path}/annotations/instances_default.json")
    by_item = {img["file_name"].rsplit(".", 1)[0]: img for img in api.dataset["images"]}
    n_items = n_ann = mismatches = 0
    kinds = defaultdict(int)
    for item in ds:
        n_items += 1
        img = by_item[item.id]
        h, w = img["height"], img["width"]
        if has_images:
            media = item.media if hasattr(item, "media") else item.image    # CVAT's fork: .image
            assert media is not None and media.has_data, f"no image for {item.id}"
            assert tuple(media.size) == (h, w), (item.id, media.size, (h, w))
        got = defaultdict(lambda: np.zeros((h, w), bool))
        for ann in item.annotations:
            m = raster(ann, h, w)
            if m is None:
                continue
            kinds[ann.type.name] += 1
            n_ann += 1
            got[names[ann.label]] |= m
        want = defaultdict(lambda: np.zeros((h, w), bool))
        for a in api.loadAnns(api.getAnnIds(imgIds=[img["id"]])):
            want[api.loadCats([a["category_id"]])[0]["name"]] |= api.annToMask(a).astype(bool)
        for name in set(got) | set(want):
            mismatches += int((got[name] ^ want[name]).sum())
    out["coco_instances"] = {"items": n_items, "annotations": n_ann, "by_type": dict(kinds),
                             "labels": names, "pixels_differing_from_pycocotools": mismatches}
    if has_panoptic:
        pan = Dataset.import_from(path, "coco_panoptic")
        out["coco_panoptic"] = {"items": len(pan), "annotations": sum(len(i.annotations) for i in pan)}
    try:
        detected = Dataset.import_from(path).__len__()      # format auto-detection, as `datum` does
        out["auto_detected_items"] = detected
    except Exception as exc:  # noqa: BLE001
        out["auto_detected_error"] = f"{type(exc).__name__}: {exc}"
    return out


def main():
    exports = json.load(open(sys.argv[1]))["exports"]
    result = {}
    for name, e in exports.items():
        try:
            result[name] = {"ok": True, **check(e["dir"], e["options"]["include_images"],
                                                e["options"]["panoptic"])}
        except Exception as exc:  # noqa: BLE001
            result[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print("RESULT " + json.dumps(result))


main()
