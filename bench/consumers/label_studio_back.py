"""Corrections made in Label Studio, exported the two ways Label Studio offers, for the app to import.

Takes the app's polygons export (its label_studio/tasks.json and label_config.xml), turns
each task's predictions into the annotation a person submits after editing them (in the first
task every 'person' region deleted), and writes:
- OUT/ls_json_export.json: Label Studio's JSON export of those tasks (what its *Export -> JSON*
  gives: tasks with 'annotations');
- OUT/ls_coco/result.json (+ images/): the same tasks through label-studio-sdk's COCO converter,
  the code Label Studio's *Export -> COCO* runs, with local files read from the export folder;
- OUT/ls_json_export_brush.json and OUT/ls_coco_brush/: the same with the masks export's brush
  regions (how many COCO annotations the converter makes of them).

Usage (venv with label-studio-sdk): python label_studio_back.py EXPORTS_JSON OUT  -> prints one JSON object.
"""
import json
import os
import sys
from pathlib import Path


def main():
    exports = json.load(open(sys.argv[1]))["exports"]
    out = Path(sys.argv[2])
    export_dir = Path(exports["polygons"]["dir"])
    os.environ["LOCAL_FILES_SERVING_ENABLED"] = "true"
    os.environ["LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"] = "true"
    os.environ["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] = str(export_dir)
    os.environ["LOCAL_FILES_DOCUMENT_ROOT"] = str(export_dir)
    from label_studio_sdk.converter import Converter
    import label_studio_sdk

    tasks = json.loads((export_dir / "label_studio" / "tasks.json").read_text())
    removed = 0
    for n, task in enumerate(tasks):
        result = task["predictions"][0]["result"]
        if n == 0:
            kept = [r for r in result if r["value"].get("polygonlabels") != ["person"]]
            removed, result = len(result) - len(kept), kept
        task["id"] = n + 1
        task["annotations"] = [{"id": n + 1, "result": result, "was_cancelled": False, "ground_truth": False,
                                "created_at": "2026-12-04T10:00:00Z", "updated_at": "2026-12-04T10:00:00Z",
                                "completed_by": 1}]
    ls_json = out / "ls_json_export.json"
    ls_json.write_text(json.dumps(tasks))
    coco_dir = out / "ls_coco"
    conv = Converter(config=str(export_dir / "label_studio" / "label_config.xml"), project_dir=str(out),
                     download_resources=True)
    conv.convert_to_coco(input_data=str(ls_json), output_dir=str(coco_dir), is_dir=False)
    coco = json.loads((coco_dir / "result.json").read_text())
    # the same with brush regions (the masks export's tasks): Label Studio's COCO converter drops them
    brush_tasks = json.loads((Path(exports["masks"]["dir"]) / "label_studio" / "tasks.json").read_text())
    for n, task in enumerate(brush_tasks):
        task["id"] = n + 1
        task["annotations"] = [{"id": n + 1, "result": task["predictions"][0]["result"], "was_cancelled": False}]
    brush_json = out / "ls_json_export_brush.json"
    brush_json.write_text(json.dumps(brush_tasks))
    os.environ["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] = os.environ["LOCAL_FILES_DOCUMENT_ROOT"] = \
        exports["masks"]["dir"]
    Converter(config=str(Path(exports["masks"]["dir"]) / "label_studio" / "label_config.xml"),
              project_dir=str(out), download_resources=True).convert_to_coco(
        input_data=str(brush_json), output_dir=str(out / "ls_coco_brush"), is_dir=False)
    brush_coco = json.loads((out / "ls_coco_brush" / "result.json").read_text())
    print("RESULT " + json.dumps({
        "ok": True, "label_studio_sdk": label_studio_sdk.__version__ if hasattr(label_studio_sdk, "__version__")
        else "?", "json_export": str(ls_json), "coco_export": str(coco_dir / "result.json"),
        "first_task_person_regions_removed": removed,
        "coco_file_names": [i["file_name"] for i in coco["images"]],
        "coco_annotations": len(coco["annotations"]), "brush_json_export": str(brush_json),
        "brush_regions": sum(len(t["annotations"][0]["result"]) for t in brush_tasks),
        "brush_coco_annotations": len(brush_coco["annotations"])}))


main()
