"""Corrected masks imported back from an annotation tool: the export -> correct -> import -> refine loop."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from sqlalchemy import func, select

from stego_app import corrections, export, label_kinds, refinement, runs
from stego_app.coco import decode_rle, encode_rle
from stego_app.errors import UserError
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
    assert "'Pole' (1)" in text and "name a cluster or find it" in text and "1 image(s) not in this run" in text
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
    after = export.export_run(ctx, run.id, export.ExportOptions())
    assert after.refined_used and not any("corrections" in w for w in after.warnings)
    state = refinement.refined_state(ctx, run.id)
    assert state.corrections_pending == 0 and not state.stale and "up to date" in state.text
    [shown] = refinement.image_corrections(ctx, run.id, item.image_id)
    assert shown.in_maps and shown.labels[0] != "Pole" and "corrected.json" in shown.source
    assert "the refined maps show them as drawn" in shown.text
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
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(UserError, match="not a COCO instances file"):
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

    corrections.remove_corrections(ctx, run.id, item.image_id)
    with ctx.db.read() as s:                             # the label kept only for them goes with them
        assert s.scalar(select(func.count()).select_from(Label).where(Label.run_id == run.id,
                                                                      Label.name == "tree")) == 0
    ctx.close()
