"""Round trip through a real Label Studio server (run in a venv with `label-studio` + pycocotools).

For each export with Label Studio tasks, starts `label-studio` on 127.0.0.1:PORT with
local-files serving rooted at that unzipped export (as docs/export.md tells users),
creates a project with the export's labelling config, connects the images/ folder as
local storage, imports tasks.json, reads every prediction back through the API, decodes
it (brush RLE with Label Studio's own decoder, polygons rasterised with pycocotools)
and compares it pixel for pixel with the export's COCO masks of the same image; then fetches
every task's image URL from the server and compares the bytes with images/<file_name>.

Usage: python check_label_studio.py EXPORTS_JSON PORT  -> prints 'RESULT {json}'.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict

import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from pycocotools import mask as mu
from pycocotools.coco import COCO

TOKEN = "stego-bench-token-0123456789"


def api(port, method, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        data = r.read()
        return r.status, (json.loads(data) if data and r.headers.get_content_type() == "application/json" else data)


def coco_by_label(api_coco, image_id, h, w):
    out = defaultdict(lambda: np.zeros((h, w), bool))
    for a in api_coco.loadAnns(api_coco.getAnnIds(imgIds=[image_id])):
        out[api_coco.loadCats([a["category_id"]])[0]["name"]] |= api_coco.annToMask(a).astype(bool)
    return out


def check_export(port, name, e):
    d = e["dir"]
    config = open(f"{d}/label_studio/label_config.xml").read()
    tasks = json.load(open(f"{d}/label_studio/tasks.json"))
    _, project = api(port, "POST", "/api/projects", {"title": f"stego {name}", "label_config": config})
    pid = project["id"]
    status, storage = api(port, "POST", "/api/storages/localfiles", {
        "project": pid, "path": f"{d}/images", "use_blob_urls": False, "title": "export images"})
    status, imported = api(port, "POST", f"/api/projects/{pid}/import", tasks)
    back = []
    page = 1
    while True:
        try:
            _, data = api(port, "GET", f"/api/tasks?project={pid}&page={page}&page_size=100&fields=all")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                break
            raise
        items = data["tasks"] if isinstance(data, dict) else data
        if not items:
            break
        back.extend(items)
        page += 1
    api_coco = COCO(f"{d}/annotations/instances_default.json")
    differing = n_results = 0
    images_ok = 0
    image_errors = []
    for task in back:
        image_id = task["data"]["image_id"]
        img = api_coco.loadImgs([image_id])[0]
        h, w = img["height"], img["width"]
        preds = task.get("predictions") or []
        if preds and isinstance(preds[0], int):
            preds = [api(port, "GET", f"/api/predictions/{p}")[1] for p in preds]
        got = defaultdict(lambda: np.zeros((h, w), bool))
        for r in preds[0]["result"]:
            n_results += 1
            v = r["value"]
            if r["type"] == "brushlabels":
                m = decode_rle(v["rle"]).reshape(h, w, 4)[:, :, 3] > 0
                got[v["brushlabels"][0]] |= m
            else:
                flat = [c for x, y in v["points"] for c in (x * w / 100.0, y * h / 100.0)]
                got[v["polygonlabels"][0]] |= mu.decode(mu.merge(mu.frPyObjects([flat], h, w))).astype(bool)
        want = coco_by_label(api_coco, image_id, h, w)
        for label in set(got) | set(want):
            differing += int((got[label] ^ want[label]).sum())
        with open(os.path.join(d, "images", img["file_name"]), "rb") as f:
            want_bytes = f.read()
        try:
            status, body = api(port, "GET", task["data"]["image"])
            if status == 200 and body == want_bytes:
                images_ok += 1
            else:
                image_errors.append(f"{task['data']['image']}: HTTP {status}, {len(body)} bytes, file {len(want_bytes)}")
        except urllib.error.HTTPError as exc:
            image_errors.append(f"{task['data']['image']}: HTTP {exc.code}")
    return {"ok": differing == 0 and len(back) == len(tasks) and images_ok == len(back),
            "tasks_imported": imported.get("task_count"),
            "predictions_imported": imported.get("prediction_count"), "tasks_read_back": len(back),
            "results_read_back": n_results, "pixels_differing_from_coco": differing,
            "local_files_document_root": "<the unzipped export>", "image_urls": sorted({t["data"]["image"] for t in back}),
            "images_served_by_local_files": images_ok, "image_errors": image_errors[:5],
            "regions": e["options"]["ls_regions"]}


def start_server(port, root):
    """Label Studio with local-files serving rooted at ROOT (the unzipped export) and a fresh data dir."""
    data_dir = tempfile.mkdtemp(prefix="ls-data-")
    env = dict(os.environ, LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
               LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=root, LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true")
    exe = os.path.join(os.path.dirname(sys.executable), "label-studio")
    log = open(os.path.join(data_dir, "server.log"), "w")
    server = subprocess.Popen([exe, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
                               "--data-dir", data_dir, "--username", "bench@example.com", "--password",
                               "bench-password-1", "--user-token", TOKEN, "--enable-legacy-api-token"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return server, data_dir
        except Exception:  # noqa: BLE001
            if server.poll() is not None or time.time() > deadline:
                stop_server(server, None)
                raise RuntimeError("Label Studio did not start: " + open(log.name).read()[-2000:])
            time.sleep(2)


def stop_server(server, data_dir):
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
    if data_dir:
        shutil.rmtree(data_dir, ignore_errors=True)


def main():
    exports = json.load(open(sys.argv[1]))["exports"]
    port = int(sys.argv[2])
    import label_studio
    result = {"label_studio_version": label_studio.__version__}
    for name, e in exports.items():
        if not e["options"]["label_studio"]:
            continue
        # one server per export: its tasks use /data/local-files/?d=images/..., relative to the export folder
        server, data_dir = start_server(port, e["dir"])
        try:
            result[name] = check_export(port, name, e)
        except urllib.error.HTTPError as exc:
            result[name] = {"ok": False, "error": f"HTTP {exc.code}: {exc.read()[:500]!r}"}
        finally:
            stop_server(server, data_dir)
    print("RESULT " + json.dumps(result))


main()
