"""A data folder moved or copied elsewhere keeps its runs, images, refinements and exports."""
from __future__ import annotations

import json
import shutil

import numpy as np

from stego_app import export, ingest, refinement, relocation, runs
from stego_app.config import AppConfig
from stego_app.context import create_context
from stego_app.labels import mapping, views
from tests.conftest import make_finished_run

QUICK = dict(steps=40, hidden=16, batch_size=256)


def _open(data_dir):
    return create_context(AppConfig(data_dir=data_dir, worker=True, demo=False, backbone="test_tiny",
                                    device="cpu", pipeline_jobs=1))


def _json_strings(folder):
    out = []
    for path in folder.rglob("*.json"):
        out.append(path.read_text())
    return "\n".join(out)


def test_a_moved_data_folder_keeps_working_and_a_copy_stops_touching_the_original(tmp_path):
    ctx, run = make_finished_run(tmp_path / "first")
    mapping.name_cluster(ctx, run.id, 0, "ground")
    first_export = export.export_run(ctx, run.id, export.ExportOptions())
    ctx.close()
    old = (tmp_path / "first" / "data").resolve()

    # moved: every stored path followed it, and the run is usable as before
    moved = (tmp_path / "elsewhere" / "data")
    moved.parent.mkdir()
    shutil.move(str(old), str(moved))
    moved = moved.resolve()
    ctx = _open(moved)
    try:
        info = runs.get_run(ctx, run.id)
        assert info.status == "done" and str(info.run_dir).startswith(str(moved))
        assert str(old) not in _json_strings(moved / "runs") + _json_strings(moved / "cache")
        item = runs.run_images(ctx, run.id)[0]
        stored = ingest.get_image(ctx, item.image_id).path
        assert str(stored).startswith(str(moved)) and stored.is_file()
        view = views.render_segmentation(ctx, run.id, item.image_id, crf=True)
        assert view.overlay.shape[:2] == view.original.shape[:2]
        assert str(export.get_export(ctx, first_export.id).zip_path).startswith(str(moved))
        job = refinement.wait_for_refinement(ctx, refinement.start_refinement(ctx, run.id, QUICK).id, timeout=300)
        assert job.status == "done", job.error           # reads the moved features, writes the moved run
        again = export.export_run(ctx, run.id, export.ExportOptions(include_images=True))
        assert again.refined_used and again.zip_path.is_file()
        assert relocation.relocate(ctx.db, ctx.config) == {}      # nothing left to move at the next start
    finally:
        ctx.close()

    # copied: the copy uses its own files; the original's run is not written by it
    copy = (tmp_path / "copy" / "data")
    shutil.copytree(moved, copy)
    copy = copy.resolve()
    before = {p: p.stat().st_mtime_ns for p in (moved / "runs").rglob("*") if p.is_file()}
    ctx = _open(copy)
    try:
        assert str(runs.get_run(ctx, run.id).run_dir).startswith(str(copy))
        mapping.name_cluster(ctx, run.id, 1, "sky")
        job = refinement.wait_for_refinement(ctx, refinement.start_refinement(ctx, run.id, QUICK).id, timeout=300)
        assert job.status == "done", job.error
        seg = views.read_segments(runs.get_run(ctx, run.id).run_dir, 0, crf=True, refined=True)
        assert seg.size > 0 and np.isin(seg, np.arange(8)).all()
    finally:
        ctx.close()
    after = {p: p.stat().st_mtime_ns for p in (moved / "runs").rglob("*") if p.is_file()}
    assert after == before
    meta = json.loads((copy / "runs" / str(run.id) / "segments_refined" / "meta.json").read_text())
    assert meta["mapping_version"] > 0


def test_with_a_database_outside_the_data_folder_only_a_folder_that_is_gone_counts(tmp_path):
    """Hosts that share one database may mount the data at different places: a folder that still
    exists is another host's, not a move, and its paths are left as they are."""
    from stego_app import projects
    from stego_app.models import Run

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = (tmp_path / "a" / "data").resolve(), (tmp_path / "b" / "data").resolve()

    def open_on(folder):
        return create_context(AppConfig(data_dir=folder, database_url=url, worker=False, demo=False))

    ctx = open_on(a)
    project = projects.create_project(ctx, "shared")
    with ctx.db.write() as s:
        run = Run(project_id=project.id, status="done", params={}, run_dir="")
        s.add(run)
        s.flush()
        run.run_dir = str(a / "runs" / str(run.id))
        run_id = run.id
    (a / "runs" / str(run_id)).mkdir(parents=True)
    ctx.close()
    shutil.copytree(a, b)                                # the same data, seen from another place

    ctx = open_on(b)
    assert runs.get_run(ctx, run_id).run_dir == a / "runs" / str(run_id)
    ctx.close()
    shutil.rmtree(a)                                     # now it was a move
    ctx = open_on(b)
    assert runs.get_run(ctx, run_id).run_dir == b / "runs" / str(run_id)
    ctx.close()
