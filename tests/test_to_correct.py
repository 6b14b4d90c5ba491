"""Images to correct first: listed from a finished run's features, exported alone, kept when features are gone."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image as PILImage

from core.rundir import RunDir
from core.settings import RunSettings
from stego_app import cli, corrections, ingest, projects, runs, to_correct
from stego_app.config import AppConfig
from stego_app.coco import encode_rle
from stego_app.context import create_context
from stego_app.errors import UserError
from stego_app.export import ExportOptions, export_run, list_exports
from stego_app.labels import mapping
from stego_app.models import RUN_CANCELLED, RUN_DONE, Run
from stego_app.ui import formatting as H
from tests.conftest import write_scene_images


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished tiny run on five near-alike street scenes and one image unlike them (a checkerboard)."""
    root = tmp_path_factory.mktemp("to_correct")
    ctx = create_context(AppConfig(data_dir=root / "data", worker=True, demo=False, backbone="test_tiny",
                                   device="cpu", pipeline_jobs=1))
    paths = write_scene_images(root / "imgs", n=5, size=(64, 48))
    odd = root / "imgs" / "odd_one.png"
    board = (np.indices((48, 64)).sum(axis=0) // 4 % 2 * 255).astype(np.uint8)
    PILImage.fromarray(np.stack([board, 255 - board, board // 2], axis=-1)).save(odd)
    project = projects.create_project(ctx, "streets")
    ingest.ingest_files(ctx, project.id, [*paths[:3], odd, *paths[3:]])
    settings = RunSettings(backbone="test_tiny", resolution=48, n_clusters=4, batch_size=4, code_dim=8, steps=10,
                           crf=False)
    run = runs.wait_for_run(ctx, runs.start_run(ctx, project.id, settings).id, timeout=300)
    assert run.status == "done", run.error
    mapping.name_cluster(ctx, run.id, 0, "sky")
    yield ctx, run, root
    ctx.close()


def test_the_image_unlike_the_others_is_among_the_two_to_correct_first(done):
    ctx, run, _ = done
    picked = to_correct.images_to_correct(ctx, run.id, 2)
    assert [p.rank for p in picked] == [1, 2]
    assert picked[1].name == "odd_one.png"          # the larger kind (the five scenes) comes first
    assert picked[0].name.startswith("scene_")
    assert to_correct.images_to_correct(ctx, run.id, 2) == picked          # the same list every time
    assert len(to_correct.images_to_correct(ctx, run.id, 50)) == 6        # never more than the run has
    with pytest.raises(UserError, match="whole number >= 1"):
        to_correct.images_to_correct(ctx, run.id, 0)


def test_an_export_of_the_images_to_correct_holds_just_those_most_useful_first(done):
    ctx, run, _ = done
    picked = to_correct.images_to_correct(ctx, run.id, 2)
    info = export_run(ctx, run.id, ExportOptions(to_correct=2))
    data = json.loads(info.json_path.read_text())
    assert [i["id"] for i in data["images"]] == [p.image_id for p in picked] and info.n_images == 2
    assert info.to_correct_images == tuple(p.name for p in picked)
    summary = H.export_summary(info)
    assert "2 images to correct first" in summary and "odd_one.png" in summary and "Import corrected" in summary
    everything = export_run(ctx, run.id, ExportOptions())
    assert everything.n_images == 6 and everything.to_correct_images == ()
    with pytest.raises(UserError, match="whole number >= 0"):
        export_run(ctx, run.id, ExportOptions(to_correct=-1))


def test_the_cli_lists_them_and_exports_them(done, capsys):
    ctx, run, root = done
    data = ["--data-dir", str(root / "data")]
    assert cli.main(["label", str(run.id), "to-correct", "-n", "2", *data]) == 0
    out = capsys.readouterr().out
    assert "  1. image" in out and "  2. image" in out and "odd_one.png" in out and "import-corrections" in out
    assert cli.main(["label", str(run.id), "to-correct", "-n", "2", "--json", *data]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [p["rank"] for p in listed] == [1, 2] and listed[1]["name"] == "odd_one.png"
    assert cli.main(["export", str(run.id), "--to-correct", "2", *data]) == 0
    latest = list_exports(ctx, run.id)[0]
    assert latest.n_images == 2 and latest.to_correct_images == tuple(p["name"] for p in listed)


def test_with_the_features_cache_cleared_it_says_what_to_do_and_records_no_export(done):
    ctx, run, _ = done
    store = RunDir(run.run_dir).infer_store().root
    moved = store.with_name(store.name + "_away")
    n_exports = len(list_exports(ctx, run.id))
    shutil.move(store, moved)
    try:
        with pytest.raises(UserError, match="resume or re-run discovery"):
            to_correct.images_to_correct(ctx, run.id, 2)
        with pytest.raises(UserError, match="resume or re-run discovery"):
            export_run(ctx, run.id, ExportOptions(to_correct=2))
        assert len(list_exports(ctx, run.id)) == n_exports
        assert export_run(ctx, run.id, ExportOptions()).n_images == 6      # a plain export still works
    finally:
        shutil.move(moved, store)


def _corrected(export_json, tmp_path):
    """The export as a person corrects it: every image painted all 'sky'."""
    data = json.loads(export_json.read_text())
    sky = next(c["id"] for c in data["categories"] if c["name"] == "sky")
    data["annotations"] = [
        {"id": k + 1, "image_id": im["id"], "category_id": sky, "iscrowd": 0, "area": im["width"] * im["height"],
         "bbox": [0, 0, im["width"], im["height"]],
         "segmentation": encode_rle(np.ones((im["height"], im["width"]), np.uint8))}
        for k, im in enumerate(data["images"])]
    path = tmp_path / f"corrected_{len(data['images'])}.json"
    path.write_text(json.dumps(data))
    return path


def test_after_importing_a_batch_the_next_one_leaves_it_out(done, capsys, tmp_path):
    ctx, run, root = done
    first = to_correct.images_to_correct(ctx, run.id, 2)
    exported = export_run(ctx, run.id, ExportOptions(to_correct=2, style="masks"))
    corrections.import_corrections(ctx, run.id, _corrected(exported.json_path, tmp_path))
    try:
        assert set(corrections.corrected_images(ctx, run.id)) == {p.image_id for p in first}
        nxt = to_correct.images_to_correct(ctx, run.id, 2)
        assert len(nxt) == 2 and not {p.image_id for p in nxt} & {p.image_id for p in first}
        info = export_run(ctx, run.id, ExportOptions(to_correct=2))
        assert info.to_correct_images == tuple(p.name for p in nxt) and info.to_correct_done == 2
        assert "2 images whose corrections are already imported were left out" in H.export_summary(info)
        rest = to_correct.images_to_correct(ctx, run.id, 50)
        assert len(rest) == 4 and not {p.image_id for p in rest} & {p.image_id for p in first}
        assert cli.main(["label", str(run.id), "to-correct", "-n", "2", "--data-dir", str(root / "data")]) == 0
        assert "2 image(s) whose corrections are already imported are left out" in capsys.readouterr().out
        ex_all = export_run(ctx, run.id, ExportOptions(style="masks"))
        corrections.import_corrections(ctx, run.id, _corrected(ex_all.json_path, tmp_path))
        with pytest.raises(UserError, match="no image left to correct"):
            to_correct.images_to_correct(ctx, run.id, 2)
        with pytest.raises(UserError, match="no image left to correct"):
            export_run(ctx, run.id, ExportOptions(to_correct=2))
    finally:
        for image_id in corrections.corrected_images(ctx, run.id):
            corrections.remove_corrections(ctx, run.id, image_id)
    assert to_correct.images_to_correct(ctx, run.id, 2) == first


def test_a_run_that_is_not_finished_says_so_and_records_no_export(done):
    ctx, run, _ = done
    n_exports = len(list_exports(ctx, run.id))
    with ctx.db.write() as s:
        s.get(Run, run.id).status = RUN_CANCELLED
    try:
        with pytest.raises(UserError, match=f"run {run.id} is cancelled; images to correct are picked from a "
                                            "finished run"):
            to_correct.images_to_correct(ctx, run.id, 2)
        with pytest.raises(UserError, match="only finished runs can be exported"):
            export_run(ctx, run.id, ExportOptions(to_correct=2))
        assert len(list_exports(ctx, run.id)) == n_exports
    finally:
        with ctx.db.write() as s:
            s.get(Run, run.id).status = RUN_DONE
    assert len(to_correct.images_to_correct(ctx, run.id, 2)) == 2
