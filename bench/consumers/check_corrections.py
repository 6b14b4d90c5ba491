"""Import a corrected COCO file (made by a real tool) into the consumers' run and check the stored masks.

Runs in the app's venv on the work folder of bench/consumers_make_exports.py. Checks, per
corrected image: the corrections the app stored equal pycocotools' rasterisation of the tool's
file (larger annotations first, a smaller one drawn over them), and the edits the tool made
are there (edit_with_datumaro.py: a drawn car, deleted persons, cars relabelled as persons).

Usage: python check_corrections.py WORK_DIR EDIT_RESULT_JSON  -> prints one JSON object.
"""
from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
from pycocotools import mask as mu

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sqlalchemy import select  # noqa: E402

from stego_app import corrections, refinement  # noqa: E402
from stego_app.coco import decode_rle  # noqa: E402
from stego_app.config import AppConfig  # noqa: E402
from stego_app.context import create_context  # noqa: E402
from stego_app.models import Correction, Image, Label, RunImage  # noqa: E402


def _tool_maps(zip_path: str) -> dict[str, dict[str, np.ndarray]]:
    """file_name -> label name -> mask, from the tool's file, by pycocotools."""
    with zipfile.ZipFile(zip_path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".json"))
        data = json.loads(zf.read(name))
    cats = {c["id"]: c["name"] for c in data["categories"]}
    out = {}
    for img in data["images"]:
        h, w = img["height"], img["width"]
        owner = np.full((h, w), "", dtype=object)
        anns = sorted((a for a in data["annotations"] if a["image_id"] == img["id"]), key=lambda a: -a["area"])
        for a in anns:
            seg = a["segmentation"]
            rle = mu.frPyObjects(seg, h, w) if isinstance(seg, list) else (
                mu.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg)
            m = mu.decode(mu.merge(rle) if isinstance(rle, list) else rle).astype(bool)
            owner[m] = cats[a["category_id"]]
        out[img["file_name"]] = {n: owner == n for n in set(owner.ravel()) if n}
    return out


def main() -> None:
    work, edit = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    ctx = create_context(AppConfig(data_dir=work / "data", demo=False, worker=False))
    run_id = 1
    report = corrections.import_corrections(ctx, run_id, Path(edit["zip"]))
    with ctx.db.read() as s:
        rows = s.execute(select(Image.name, Label.name, Correction.rle, RunImage.confirmed)
                         .join(Image, Image.id == Correction.image_id).join(Label, Label.id == Correction.label_id)
                         .join(RunImage, (RunImage.image_id == Image.id) & (RunImage.run_id == run_id))
                         .where(Correction.run_id == run_id)).all()
    stored: dict[str, dict[str, np.ndarray]] = {}
    checked = {}
    for img_name, label, rle, confirmed in rows:
        stored.setdefault(img_name, {})[label] = decode_rle(rle).astype(bool)
        checked[img_name] = bool(confirmed)
    tool = _tool_maps(edit["zip"])
    differing = {}
    for name, want in tool.items():
        got = stored.get(name, {})
        differing[name] = int(sum((got.get(k, False) ^ want.get(k, False)).sum() for k in set(got) | set(want)))
    y0, y1, x0, x1 = edit["a/street"]["car_box"]
    street = stored.get("a/street.png", {})
    park = stored.get("park.jpg", {})
    box = np.zeros_like(next(iter(street.values())), bool)
    box[y0:y1, x0:x1] = True
    listed = refinement.image_corrections(ctx, run_id)
    ctx.close()
    print("RESULT " + json.dumps({
        "ok": True, "summary": report.summary(), "images": sorted(report.images), "annotations": report.annotations,
        "problems": report.problems(), "checked": checked,
        "pixels_differing_from_pycocotools": differing,
        "a/street: share of the drawn car stored as car": round(float((street.get("car", box & False) & box).sum()
                                                                      / box.sum()), 4),
        "a/street: share of the drawn car that is car in the tool's file": round(float(
            (tool["a/street.png"].get("car", box & False) & box).sum() / box.sum()), 4),
        "a/street: person pixels stored": int(street["person"].sum()) if "person" in street else 0,
        "park: car pixels stored": int(park["car"].sum()) if "car" in park else 0,
        "park: person pixels stored": int(park["person"].sum()) if "person" in park else 0,
        "listed": [c.text for c in listed],
    }))


main()
