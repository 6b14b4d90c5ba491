"""COCO panoptic exports through panopticapi's own ``pq_compute`` (the reference PQ code).

Usage: python check_panoptic.py EXPORTS_JSON PANOPTICAPI_CHECKOUT  -> prints one RESULT line.

panopticapi is not on PyPI: point to a checkout of github.com/cocodataset/panopticapi (its code
is run from there, not copied). For every export with panoptic files: (1) the export scored
against itself must give PQ 100 for things, stuff and all, with both kinds present; (2) a
prediction with every segment of one thing category removed (its pixels void) must give that
category PQ 0 and leave the others at 100: PQ really is computed per segment, not passed through.
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def rgb2id(a):
    a = a.astype(np.uint32)
    return a[..., 0] + 256 * a[..., 1] + 256 * 256 * a[..., 2]


def id2rgb(ids):
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def drop_category(gt_json, gt_dir, cat_id, out_json, out_dir):
    """A prediction equal to the ground truth except that category ``cat_id`` is gone (void)."""
    data = json.loads(Path(gt_json).read_text())
    for ann in data["annotations"]:
        gone = [s["id"] for s in ann["segments_info"] if s["category_id"] == cat_id]
        ann["segments_info"] = [s for s in ann["segments_info"] if s["category_id"] != cat_id]
        src = Path(gt_dir) / ann["file_name"]
        dst = Path(out_dir) / ann["file_name"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        ids = rgb2id(np.asarray(Image.open(src).convert("RGB")))
        ids[np.isin(ids, gone)] = 0
        Image.fromarray(id2rgb(ids)).save(dst)
    Path(out_json).write_text(json.dumps(data))


def main():
    exports, checkout = Path(sys.argv[1]), Path(sys.argv[2])
    sys.path.insert(0, str(checkout))
    from panopticapi.evaluation import pq_compute

    result = {"ok": True, "exports": {}}
    for name, info in json.loads(exports.read_text())["exports"].items():
        root = Path(info["dir"])
        gt_json = root / "annotations" / "panoptic_default.json"
        if not gt_json.is_file():
            continue
        gt_dir = root / "annotations" / "panoptic_default"
        cats = json.loads(gt_json.read_text())["categories"]
        kinds = {c["id"]: c["isthing"] for c in cats}
        same = pq_compute(str(gt_json), str(gt_json), str(gt_dir), str(gt_dir))
        row = {"self_pq": {k: round(100 * same[k]["pq"], 2) for k in ("All", "Things", "Stuff")},
               "self_n": {k: same[k]["n"] for k in ("All", "Things", "Stuff")}}
        ok = all(abs(v - 100) < 1e-6 for v in row["self_pq"].values()) and row["self_n"]["Things"] > 0 \
            and row["self_n"]["Stuff"] > 0
        thing = next(c for c, t in kinds.items() if t == 1)
        tmp = Path(tempfile.mkdtemp())
        try:
            drop_category(gt_json, gt_dir, thing, tmp / "pred.json", tmp / "pred")
            pred = pq_compute(str(gt_json), str(tmp / "pred.json"), str(gt_dir), str(tmp / "pred"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        per = {c: round(100 * v["pq"], 2) for c, v in pred["per_class"].items()}
        row["dropped_category"] = thing
        row["per_class_pq_after_drop"] = per
        ok = ok and per[thing] == 0 and all(v == 100 for c, v in per.items() if c != thing)
        row["ok"] = ok
        result["exports"][name] = row
        result["ok"] = result["ok"] and ok
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
