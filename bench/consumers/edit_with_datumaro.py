"""Correct two images of the app's mask export in Datumaro and export them as COCO instances.

The stand-in for a team that fixes a few images in its tool: in ``a/street`` every person is
deleted and a car is drawn (a filled rectangle on the road); in ``park`` every car becomes a
person. Only the two corrected items are exported (``coco_instances`` with their images), and
zipped, the way CVAT hands out a task's "COCO 1.0" export.

Usage: python edit_with_datumaro.py EXPORTS_JSON OUT_DIR  -> prints one JSON object.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from datumaro.components.annotation import AnnotationType, Mask
from datumaro.components.dataset import Dataset

CAR_BOX = (80, 100, 20, 60)        # rows y0:y1, columns x0:x1 of the car drawn in a/street


def main():
    exports = json.load(open(sys.argv[1]))["exports"]
    out = Path(sys.argv[2])
    ds = Dataset.import_from(exports["masks"]["dir"], "coco_instances")
    labels = ds.categories()[AnnotationType.label]
    idx = {c.name: i for i, c in enumerate(labels.items)}
    edited = []
    for item in ds:
        if item.id == "a/street":
            h, w = item.media.size
            car = np.zeros((h, w), bool)
            y0, y1, x0, x1 = CAR_BOX
            car[y0:y1, x0:x1] = True
            anns = [a for a in item.annotations if a.label != idx["person"]]
            anns.append(Mask(image=car, label=idx["car"], id=max(a.id for a in item.annotations) + 1,
                             group=max(a.id for a in item.annotations) + 1, attributes={"is_crowd": False}))
            removed = len(item.annotations) - (len(anns) - 1)
            edited.append(item.wrap(annotations=anns))
            what_a = {"removed_person_annotations": removed, "car_box": CAR_BOX}
        elif item.id == "park":
            anns = [a.wrap(label=idx["person"]) if a.label == idx["car"] else a for a in item.annotations]
            what_p = {"relabelled_car_annotations": sum(a.label == idx["car"] for a in item.annotations)}
            edited.append(item.wrap(annotations=anns))
    sub = Dataset.from_iterable(edited, categories=ds.categories(), media_type=ds.media_type())
    target = out / "datumaro_corrected"
    if target.exists():
        shutil.rmtree(target)
    sub.export(str(target), "coco_instances", save_media=True)
    zipped = shutil.make_archive(str(out / "datumaro_corrected"), "zip", target)
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    import datumaro
    print("RESULT " + json.dumps({"ok": True, "datumaro": datumaro.__version__, "zip": zipped, "files": files,
                                  "items": [i.id for i in edited], "a/street": what_a, "park": what_p}))


main()
