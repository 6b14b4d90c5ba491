"""Import the corrections of label_studio_back.py (Label Studio's JSON and COCO exports) into the run.

Runs in the app's venv on the work folder of bench/consumers_make_exports.py. For each of the two
files: which images matched (two of them are both "street.png" in different folders, which
Label Studio's COCO export flattens), and per image and label the IoU between the stored mask and
the app's own mask export (the polygons went through Label Studio's percent coordinates), and
that the person regions deleted in the first task stayed deleted.

Usage: python check_ls_corrections.py WORK_DIR LS_RESULT_JSON  -> prints one JSON object.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sqlalchemy import select  # noqa: E402

from stego_app import corrections  # noqa: E402
from stego_app.coco import decode_rle  # noqa: E402
from stego_app.config import AppConfig  # noqa: E402
from stego_app.context import create_context  # noqa: E402
from stego_app.errors import UserError  # noqa: E402
from stego_app.models import Correction, Image, Label  # noqa: E402


def _truth(work: Path) -> dict[str, dict[str, np.ndarray]]:
    """ingested image name -> label -> mask, from the app's own mask export."""
    exports = json.loads((work / "exports.json").read_text())["exports"]
    coco = json.loads((Path(exports["masks"]["dir"]) / "annotations" / "instances_default.json").read_text())
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    out: dict[str, dict[str, np.ndarray]] = {}
    for a in coco["annotations"]:
        m = decode_rle(a["segmentation"]).astype(bool)
        per = out.setdefault(a["image_id"], {})
        per[cats[a["category_id"]]] = per.get(cats[a["category_id"]], False) | m
    return out


def main() -> None:
    work, ls = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    ctx = create_context(AppConfig(data_dir=work / "data", demo=False, worker=False))
    truth = _truth(work)
    result = {"ok": True}
    for key in ("json_export", "coco_export", "brush_json_export"):
        try:
            report = corrections.import_corrections(ctx, 1, Path(ls[key]))
        except UserError as exc:
            result[key] = {"ok": False, "error": str(exc)}
            continue
        with ctx.db.read() as s:
            rows = s.execute(select(Image.id, Image.name, Label.name, Correction.rle)
                             .join(Image, Image.id == Correction.image_id)
                             .join(Label, Label.id == Correction.label_id).where(Correction.run_id == 1)).all()
        ious, person_first = {}, None
        for image_id, name, label, rle in rows:
            got = decode_rle(rle).astype(bool)
            want = truth.get(image_id, {}).get(label, np.zeros_like(got))
            ious[f"{name}:{label}"] = round(float((got & want).sum() / max((got | want).sum(), 1)), 4)
        first = min(truth)
        person_first = sum(int(decode_rle(rle).sum()) for iid, _, label, rle in rows
                           if iid == first and label == "person")
        result[key] = {"summary": report.summary(), "images": sorted(report.images),
                       "problems": report.problems(), "min_iou": min(ious.values()) if ious else None,
                       "iou": ious, "person_pixels_in_first_image": person_first,
                       "person_pixels_in_first_image_before": int(truth[first].get("person", np.zeros(1)).sum())}
    ctx.close()
    print("RESULT " + json.dumps(result))


main()
