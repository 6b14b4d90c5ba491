"""Corrected masks imported back from an annotation tool: the export -> correct -> import -> refine loop."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from stego_app import corrections, export, label_kinds, refinement, runs
from stego_app.coco import decode_rle, encode_rle
from stego_app.errors import NotFound, UserError
from stego_app.labels import mapping, views
from stego_app.models import Correction, Label, RunImage
from tests.conftest import make_finished_run

QUICK = dict(steps=60, hidden=16, batch_size=256)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    ctx, run = make_finished_run(tmp_path_factory.mktemp("corr"), n_clusters=6)
    mapping.merge_clusters(ctx, run.id, [0, 1], "ground")
    mapping.name_cluster(ctx, run.id, 2, "sky")
    mapping.name_cluster(ctx, run.id, 3, "tree")
    yield ctx, run
    ctx.close()


def _corrected_file(ctx, run, tmp_path):
    """The run's own COCO export, corrected as a person would in CVAT: image 0 gets a 'tree'
    rectangle drawn over everything, plus a 'pole' (no such label here) and an image of another run."""
    exp = export.export_run(ctx, run.id, export.ExportOptions(style="masks"))
    data = json.loads(exp.json_path.read_text())
    first = data["images"][0]
    h, w = first["height"], first["width"]
    tree = next(c["id"] for c in data["categories"] if c["name"] == "tree")
    box = np.zeros((h, w), np.uint8)
    box[10:30, 20:50] = 1
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == first["id"]]
    for a in data["annotations"]:                      # the person drew over what was there
        m = decode_rle(a["segmentation"]).astype(bool) & ~box.astype(bool)
        a["segmentation"], a["area"] = encode_rle(m), int(m.sum())
    data["categories"].append({"id": 999, "name": "Pole", "supercategory": ""})
    nid = max(a["id"] for a in data["annotations"]) + 1
    data["annotations"] += [
        {"id": nid, "image_id": first["id"], "category_id": tree, "segmentation": encode_rle(box),
         "area": 600, "bbox": [20, 10, 30, 20], "iscrowd": 0},
        {"id": nid + 1, "image_id": first["id"], "category_id": 999,
         "segmentation": [[1, 1, 5, 1, 5, 40, 1, 40]], "area": 160, "bbox": [1, 1, 4, 39], "iscrowd": 0},
        {"id": nid + 2, "image_id": 12345, "category_id": tree, "segmentation": encode_rle(box), "area": 600,
         "bbox": [20, 10, 30, 20], "iscrowd": 0}]
    data["images"].append({"id": 12345, "file_name": "elsewhere.jpg", "width": w, "height": h})
    path = tmp_path / "corrected.json"
    path.write_text(json.dumps(data))
    return path, first["file_name"], box.astype(bool)


def test_corrected_masks_come_back_checked_and_refinement_writes_them_into_the_maps(lab, tmp_path):
    ctx, run = lab
    path, name, box = _corrected_file(ctx, run, tmp_path)
    item = next(it for it in runs.run_images(ctx, run.id) if it.name == name)

    key_before = refinement.poll_key(ctx, run.id)
    report = corrections.import_corrections(ctx, run.id, path)
    assert refinement.poll_key(ctx, run.id) != key_before       # an open page's refine status updates
    assert "1 image with imported corrections shows as predicted" in refinement.refined_state(ctx, run.id).text
    assert report.images == [name] and report.annotations >= 2
    assert report.unknown_categories == {"Pole": 1} and report.unknown_images == ["elsewhere.jpg"]
    text = report.summary()
    assert "'Pole' (1 annotation)" in text and "it is checked now" in text and "name a cluster or find it" in text and "1 image(s) not in this run" in text
    # the export's other images came back with no annotation: said, and not counted as corrected
    others = len(runs.run_images(ctx, run.id)) - 1
    assert report.without_annotations == others
    assert f"{others} images in the file have no annotation and are not counted as corrected" in text
    assert set(corrections.corrected_images(ctx, run.id)) == {item.image_id}
    with ctx.db.read() as s:
        assert s.scalar(select(RunImage.confirmed).where(RunImage.run_id == run.id,
                                                         RunImage.image_id == item.image_id))
        tree_mask = [decode_rle(c.rle) for c in s.scalars(select(Correction).where(Correction.run_id == run.id))
                     if c.label.name == "tree"]
    assert len(tree_mask) == 1 and np.array_equal(tree_mask[0].astype(bool) & box, box)

    before_refining = export.export_run(ctx, run.id, export.ExportOptions())
    assert any("1 image with imported corrections shows as predicted" in w for w in before_refining.warnings)
    job = refinement.wait_for_refinement(ctx, refinement.start_refinement(ctx, run.id, QUICK).id, timeout=300)
    assert job.status == "done", job.error
    assert job.metrics["corrected_images"] == 1 and job.metrics["seed_tokens"] > 0
    seg = views.read_segments(run.run_dir, item.position, crf=True, refined=True)
    tree_cluster = 3
    assert (seg[box] == tree_cluster).all()             # the person's rectangle is in the refined map as drawn
    # what the person left out of every mask (here: their 'Pole', no such label) is no named label in the
    # maps: it keeps an unnamed cluster (4 or 5), and the export gives the image back as it was drawn
    with ctx.db.read() as s:
        drawn = np.zeros(seg.shape, bool)
        for c in s.scalars(select(Correction).where(Correction.run_id == run.id)):
            drawn |= decode_rle(c.rle).astype(bool)
    assert (~drawn).sum() >= 150 and set(np.unique(seg[~drawn])) <= {4, 5}
    after = export.export_run(ctx, run.id, export.ExportOptions())
    data = json.loads(after.json_path.read_text())
    [img] = [im for im in data["images"] if im["file_name"] == name]
    exported = np.zeros(seg.shape, bool)
    for a in data["annotations"]:
        if a["image_id"] == img["id"]:
            exported |= decode_rle(a["segmentation"]).astype(bool)
    assert np.array_equal(exported, drawn)
    assert after.refined_used and not any("corrections" in w for w in after.warnings)
    state = refinement.refined_state(ctx, run.id)
    assert state.corrections_pending == 0 and not state.stale and "up to date" in state.text
    [shown] = refinement.image_corrections(ctx, run.id, item.image_id)
    assert shown.in_maps and shown.labels[0] != "Pole" and "corrected.json" in shown.source
    assert "the refined maps show them as drawn; what no mask covers is none of the named labels" in shown.text
    assert export.get_export(ctx, after.id).warnings == after.warnings       # read back from the record

    # importing the same image again replaces its corrections; removing them keeps it checked
    before = corrections.corrected_images(ctx, run.id)[item.image_id]
    corrections.import_corrections(ctx, run.id, path)
    assert corrections.corrected_images(ctx, run.id)[item.image_id] == before
    state = refinement.refined_state(ctx, run.id)
    assert state.corrections_pending == 1 and state.stale
    assert "not in the refined maps yet" in refinement.image_corrections(ctx, run.id)[0].text
    assert "1 image with imported corrections shows as predicted, not as corrected; refine" in state.text
    key = refinement.poll_key(ctx, run.id)
    assert corrections.remove_corrections(ctx, run.id, item.image_id) == before
    assert corrections.corrected_images(ctx, run.id) == {}
    assert refinement.poll_key(ctx, run.id) != key and not refinement.refined_state(ctx, run.id).stale


def test_corrections_imported_while_a_refinement_runs_are_not_taken_as_in_its_maps(lab, tmp_path, monkeypatch):
    import core.refinement

    ctx, run = lab
    path, name, box = _corrected_file(ctx, run, tmp_path)
    item = next(it for it in runs.run_images(ctx, run.id) if it.name == name)
    real = core.refinement.refine

    def refine_while_a_person_imports(*args, **kwargs):     # the import lands after the job read its inputs
        corrections.import_corrections(ctx, run.id, path)
        return real(*args, **kwargs)

    monkeypatch.setattr(core.refinement, "refine", refine_while_a_person_imports)
    job = refinement.wait_for_refinement(ctx, refinement.start_refinement(ctx, run.id, QUICK).id, timeout=300)
    assert job.status == "done", job.error
    assert job.metrics["corrected_images"] == 0
    state = refinement.refined_state(ctx, run.id)
    assert state.refinement_id == job.id and state.corrections_pending == 1 and state.stale
    assert any("shows as predicted" in w for w in export.export_run(ctx, run.id, export.ExportOptions()).warnings)

    monkeypatch.setattr(core.refinement, "refine", real)
    again = refinement.wait_for_refinement(ctx, refinement.start_refinement(ctx, run.id, QUICK).id, timeout=300)
    assert again.metrics["corrected_images"] == 1 and not refinement.refined_state(ctx, run.id).stale
    assert (views.read_segments(run.run_dir, item.position, crf=True, refined=True)[box] == 3).all()
    corrections.remove_corrections(ctx, run.id, item.image_id)


def test_a_cvat_style_zip_is_read_and_a_useless_file_changes_nothing(lab, tmp_path):
    ctx, run = lab
    path, name, _ = _corrected_file(ctx, run, tmp_path)
    archive = tmp_path / "task_export.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(path, "annotations/instances_default.json")
        zf.writestr("images/readme.txt", "not json")
    report = corrections.import_corrections(ctx, run.id, archive)
    assert report.images == [name] and report.source.endswith("annotations/instances_default.json")

    def count():
        with ctx.db.read() as s:
            return s.scalar(select(func.count()).select_from(Correction).where(Correction.run_id == run.id))
    kept = count()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a JSON file"):
        corrections.import_corrections(ctx, run.id, bad)
    with pytest.raises(NotFound, match="run 999 does not exist"):     # the run first, then the file
        corrections.import_corrections(ctx, 999, bad)
    broken = tmp_path / "cut_short.zip"
    broken.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(UserError, match="cut_short.zip is not a readable zip archive"):
        corrections.import_corrections(ctx, run.id, broken)
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(UserError, match="neither a COCO instances file .* nor Label Studio.s JSON export"):
        corrections.import_corrections(ctx, run.id, bad)
    only_unknown = json.loads(path.read_text())
    only_unknown["annotations"] = [a for a in only_unknown["annotations"] if a["category_id"] == 999]
    bad.write_text(json.dumps(only_unknown))
    with pytest.raises(UserError, match="nothing imported .* the run is as it was: left out, no label .*'Pole'"):
        corrections.import_corrections(ctx, run.id, bad)
    empty_zip = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty_zip, "w") as zf:
        zf.writestr("a.txt", "x")
    with pytest.raises(UserError, match="holds no COCO instances JSON"):
        corrections.import_corrections(ctx, run.id, empty_zip)
    assert count() == kept


def test_exports_recorded_before_the_stale_reasons_still_say_why_their_maps_were_stale():
    old = export._warnings({"refined_stale": True, "corrections_pending": 2})
    assert any("made before the latest naming changes" in w for w in old)
    assert any("2 images with imported corrections show as predicted" in w for w in old)
    assert export._warnings({"refined_stale": False, "corrections_pending": 0}) == ()


def test_unnaming_a_corrected_label_keeps_its_masks_until_the_name_comes_back(tmp_path):
    ctx, run = make_finished_run(tmp_path / "run", n_clusters=6)
    mapping.merge_clusters(ctx, run.id, [0, 1], "ground")
    mapping.name_cluster(ctx, run.id, 2, "sky")
    mapping.name_cluster(ctx, run.id, 3, "tree")
    path, name, _ = _corrected_file(ctx, run, tmp_path)
    corrections.import_corrections(ctx, run.id, path)
    item = next(it for it in runs.run_images(ctx, run.id) if it.name == name)

    def stored() -> dict[str, int]:
        with ctx.db.read() as s:
            return {c.label.name: c.area for c in s.scalars(select(Correction).where(Correction.run_id == run.id))}
    before = stored()
    sky_colour = next(c.colour for c in mapping.list_clusters(ctx, run.id) if c.index == 2)
    assert {"sky", "tree", "ground"} <= set(before)

    from stego_app.ui.formatting import unname_question
    question = unname_question(["tree", "kerb"], corrections.corrected_label_names(ctx, run.id))
    assert "deletes the name 'kerb'" in question and "corrections drawn as 'tree' keep the name" in question
    mapping.ignore_cluster(ctx, run.id, 2)               # the person ignores sky after importing
    mapping.name_cluster(ctx, run.id, 3, "ground")        # and folds tree into ground
    assert stored() == before                             # the drawn masks are not lost
    assert {k.name for k in label_kinds.label_kinds(ctx, run.id)} == {"ground"}
    assert not {"sky", "tree"} & {e.name for e in mapping.legend(ctx, run.id)}
    (note,) = refinement.image_corrections(ctx, run.id, item.image_id)
    assert "No cluster is named 'sky' or 'tree' now" in note.text or "No cluster is named 'tree' or 'sky'" in note.text

    mapping.name_cluster(ctx, run.id, 2, "Sky")          # naming a cluster so again brings them back
    assert next(c.colour for c in mapping.list_clusters(ctx, run.id) if c.index == 2) == sky_colour
    (note,) = refinement.image_corrections(ctx, run.id, item.image_id)
    assert "'Sky'" not in note.text and "'tree'" in note.text
    job = refinement.wait_for_refinement(ctx, refinement.start_refinement(ctx, run.id, QUICK).id, timeout=300)
    assert job.status == "done" and job.metrics["corrected_images"] == 1

    said = refinement.forget_corrections(ctx, run.id, item.image_id)
    assert said.startswith("Corrections forgotten (") and "refine with names again" in said.lower()  # were in maps
    assert refinement.forget_corrections(ctx, run.id, item.image_id) == "This image had no imported corrections."
    with ctx.db.read() as s:                             # the label kept only for them goes with them
        assert s.scalar(select(func.count()).select_from(Label).where(Label.run_id == run.id,
                                                                      Label.name == "tree")) == 0
    ctx.close()


def _ls_export(ctx, run, regions):
    info = export.export_run(ctx, run.id, export.ExportOptions(style="masks", label_studio=True,
                                                                ls_regions=regions))
    tasks = json.loads(info.label_studio_tasks.read_text())
    coco = json.loads(info.json_path.read_text())
    return tasks, coco


def test_label_studio_json_export_comes_back_as_corrections(lab, tmp_path):
    """A team imports the Label Studio tasks, fixes the predictions and exports Label Studio JSON."""
    from stego_app import label_studio

    ctx, run = lab
    tasks, coco = _ls_export(ctx, run, "brush")
    first, second, third = tasks[0], tasks[1], tasks[2]
    h, w = first["predictions"][0]["result"][0]["original_height"], first["predictions"][0]["result"][0]["original_width"]
    drawn = np.zeros((h, w), bool)
    drawn[5:25, 10:40] = True
    kept = [r for r in first["predictions"][0]["result"] if r["value"]["brushlabels"] != ["sky"]]
    first["annotations"] = [{"id": 7, "was_cancelled": False, "updated_at": "2026-12-04T10:00:00Z",
                             "result": kept + [label_studio.brush_result("new", "tree", drawn)]}]
    second["annotations"] = [{"id": 8, "was_cancelled": True, "updated_at": "2026-12-04T10:00:00Z",
                              "result": [label_studio.brush_result("x", "tree", np.ones((h, w), bool))]}]
    third["annotations"] = [   # edited twice: the later annotation is the one that counts
        {"id": 9, "was_cancelled": False, "updated_at": "2026-12-04T09:00:00Z",
         "result": [label_studio.brush_result("old", "sky", np.ones((h, w), bool))]},
        {"id": 10, "was_cancelled": False, "updated_at": "2026-12-04T11:00:00Z",
         "result": [label_studio.brush_result("new", "tree", drawn)]}]
    path = tmp_path / "project-1-at-2026-12-04.json"
    path.write_text(json.dumps(tasks))

    report = corrections.import_corrections(ctx, run.id, path)
    assert report.source.endswith("(Label Studio JSON)") and not report.problems()
    ids = {"images/" + img["file_name"]: img["id"] for img in coco["images"]}
    one, three = (ids[label_studio.task_file_name(t["data"])] for t in (first, third))
    with ctx.db.read() as s:
        got: dict[int, dict[str, np.ndarray]] = {}
        for c in s.scalars(select(Correction).where(Correction.run_id == run.id)):
            got.setdefault(c.image_id, {})[c.label.name] = decode_rle(c.rle).astype(bool)
    assert set(got) == {one, three} and len(report.images) == 2          # the cancelled one is not read
    assert "sky" not in got[one] and np.array_equal(got[one]["tree"] & drawn, drawn)
    assert set(got[three]) == {"tree"} and np.array_equal(got[three]["tree"], drawn)   # the later annotation
    for image_id in got:
        corrections.remove_corrections(ctx, run.id, image_id)


def test_label_studio_polygons_and_its_coco_file_names_are_matched(lab, tmp_path):
    ctx, run = lab
    tasks, coco = _ls_export(ctx, run, "polygons")
    task = tasks[0]
    task["annotations"] = [{"id": 1, "was_cancelled": False, "result": task["predictions"][0]["result"]}]
    path = tmp_path / "ls.json"
    path.write_text(json.dumps([task]))
    report = corrections.import_corrections(ctx, run.id, path)
    name = coco["images"][0]["file_name"]
    assert report.images == [name] and report.annotations == len(task["predictions"][0]["result"])
    items = {it.name: it.image_id for it in runs.run_images(ctx, run.id)}
    truth = {}
    for a in coco["annotations"]:
        if a["image_id"] == coco["images"][0]["id"]:
            cat = next(c["name"] for c in coco["categories"] if c["id"] == a["category_id"])
            truth[cat] = truth.get(cat, False) | decode_rle(a["segmentation"]).astype(bool)
    with ctx.db.read() as s:
        got = {c.label.name: decode_rle(c.rle).astype(bool) for c in s.scalars(
            select(Correction).where(Correction.run_id == run.id, Correction.image_id == items[name]))}
    assert set(got) == set(truth)
    for cat, m in truth.items():          # polygons through percent coordinates: the masks, up to their edges
        assert (got[cat] & m).sum() / (got[cat] | m).sum() > 0.9, cat

    # Label Studio's own COCO export names the files it copied "images/<8 hex>__<name>"
    one = export.export_run(ctx, run.id, export.ExportOptions(style="polygons"))
    ls_coco = json.loads(one.json_path.read_text())
    ls_coco["images"] = [dict(ls_coco["images"][0], file_name=f"images/1a2b3c4d__{Path(name).name}")]
    ls_coco["annotations"] = [a for a in ls_coco["annotations"] if a["image_id"] == ls_coco["images"][0]["id"]]
    (tmp_path / "result.json").write_text(json.dumps(ls_coco))
    assert corrections.import_corrections(ctx, run.id, tmp_path / "result.json").images == [name]
    corrections.remove_corrections(ctx, run.id, items[name])
