"""Refine with names: propagation jobs on a real run (test backbone) through the services."""
from __future__ import annotations

import os

import numpy as np
import pytest

from core.refinement import ClassSpace
from core.rundir import RunDir
from stego_app import export, ingest, refinement, runs
from stego_app.errors import UserError
from stego_app.labels import annotations, mapping, views
from tests.conftest import make_finished_run

QUICK = dict(steps=60, hidden=16, batch_size=256)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    ctx, run = make_finished_run(tmp_path_factory.mktemp("lab"), n_clusters=6)
    yield ctx, run
    ctx.close()


def test_class_space_labels_unnamed_and_ignored():
    C = mapping.ClusterInfo
    cl = [C(0, 1, .1, (), "#000000", 7, "sky", False, (2,)), C(1, 1, .1, (), "#000001", None, None, False, ()),
          C(2, 1, .1, (), "#000000", 7, "sky", False, (0,)), C(3, 1, .1, (), "#777777", None, None, True, ()),
          C(4, 1, .1, (), "#000002", 9, "road", False, ())]
    space = refinement.class_space(cl)
    assert space.cluster_to_class == (0, 2, 0, 3, 1)
    assert space.class_to_cluster == (0, 4, 1, 3)
    assert space.names == ("sky", "road", "cluster 1", "ignored")
    assert (space.n_labels, space.n_unnamed) == (2, 1)
    back = ClassSpace.from_dict(space.to_dict())
    assert back == space and (back.n_labels, back.n_unnamed) == (2, 1)
    # a refinement saved before the counts were recorded still matches (it resumes)
    old = {k: v for k, v in space.to_dict().items() if k not in ("n_labels", "n_unnamed")}
    assert ClassSpace.from_dict(old) == space
    assert (ClassSpace.from_dict(old).n_labels, ClassSpace.from_dict(old).n_unnamed) == (None, None)  # unknown


def test_the_refine_status_says_how_many_classes_are_names_and_how_many_unnamed_clusters():
    state = refinement.RefinedState(True, 4, 2, 2, 77, n_labels=3, n_unnamed=73)
    assert state.text == ("Refined maps of job 4 (3 named labels, 73 unnamed clusters kept as their own classes, "
                          "the ignored clusters as one class): up to date with the names.")
    one = refinement.RefinedState(True, 4, 2, 2, 2, dense=True, n_labels=1, n_unnamed=1)
    assert one.text.startswith("Refined maps of job 4 (1 named label, 1 unnamed cluster kept as its own class; "
                               "finer maps)")
    older = refinement.RefinedState(True, 4, 2, 2, 77)        # maps made before the counts were recorded
    assert older.text.startswith("Refined maps of job 4 (77 classes)")
    # maps a resumed older job wrote with counts of 0 (no refinement starts without a name)
    zero = refinement.RefinedState(True, 6, 2, 2, 10, n_labels=0, n_unnamed=0)
    assert zero.text.startswith("Refined maps of job 6 (10 classes)")


def test_refine_writes_maps_used_by_overlays_and_exports_and_rerun_replaces_them(lab):
    ctx, run = lab
    with pytest.raises(UserError, match="name at least one cluster"):
        refinement.start_refinement(ctx, run.id, QUICK)
    mapping.merge_clusters(ctx, run.id, [0, 1], "ground")
    mapping.name_cluster(ctx, run.id, 2, "sky")
    mapping.ignore_cluster(ctx, run.id, 5)
    items = runs.run_images(ctx, run.id)
    annotations.confirm_image(ctx, run.id, items[1].image_id)
    assert not refinement.refined_state(ctx, run.id).available

    job = refinement.start_refinement(ctx, run.id, QUICK)
    assert job.params["dense"] is False          # finer maps are opt-in on a CPU (on by default with a GPU)
    with pytest.raises(UserError, match="wait for it"):
        refinement.start_refinement(ctx, run.id, QUICK)
    done = refinement.wait_for_refinement(ctx, job.id, timeout=300)
    assert done.status == "done", done.error
    assert done.metrics["n_images"] == 5 and done.metrics["seed_images"] == 1 and done.metrics["seed_tokens"] > 0
    state = refinement.refined_state(ctx, run.id)
    assert state.available and not state.stale and state.refinement_id == job.id
    assert state.n_classes == 2 + 2 + 1                       # ground, sky, clusters 3 and 4, ignored
    assert "(2 named labels, 2 unnamed clusters kept as their own classes, the ignored clusters as one class)" \
        in state.text
    allowed = {0, 2, 3, 4, 5}                                 # representatives: ground = #0 (not #1)
    for it in items:
        seg = views.read_segments(run.run_dir, it.position, crf=True, refined=True)
        assert seg.shape == (it.height, it.width) and set(np.unique(seg)) <= allowed
    assert not RunDir(run.run_dir).refined_partial(job.id).exists()

    view = views.render_segmentation(ctx, run.id, items[0].image_id, crf=True, refined=True)
    assert view.refined
    assert not views.render_segmentation(ctx, run.id, items[0].image_id, crf=True).refined

    exp = export.export_run(ctx, run.id, export.ExportOptions())
    assert exp.refined_used and exp.maps_used == "refined" and not exp.warnings
    raw = export.export_run(ctx, run.id, export.ExportOptions(refined=False))
    assert not raw.refined_used and raw.maps_used == "CRF"

    # more naming: the maps are stale (exports say so); refining again replaces them
    mapping.name_cluster(ctx, run.id, 3, "ball")
    assert refinement.refined_state(ctx, run.id).stale
    stale = export.export_run(ctx, run.id, export.ExportOptions())
    assert any("made before the latest naming changes; refine with names again" in w for w in stale.warnings)
    again = refinement.wait_for_refinement(ctx, refinement.start_refinement(ctx, run.id, QUICK).id, timeout=300)
    assert again.status == "done", again.error
    state = refinement.refined_state(ctx, run.id)
    assert state.refinement_id == again.id and not state.stale and state.n_classes == 5
    assert [r.id for r in refinement.list_refinements(ctx, run.id)] == [again.id, job.id]

    # finer maps: predicted on tokens twice as dense, computed from the images by the run's backbone
    fine = refinement.wait_for_refinement(ctx, refinement.start_refinement(ctx, run.id, dict(QUICK, dense=True)).id,
                                          timeout=300)
    assert fine.status == "done", fine.error
    assert fine.metrics["dense"] is True
    state = refinement.refined_state(ctx, run.id)
    assert state.refinement_id == fine.id and state.dense and "finer maps" in state.text
    for it in items:
        seg = views.read_segments(run.run_dir, it.position, crf=True, refined=True)
        assert seg.shape == (it.height, it.width)
    assert export.export_run(ctx, run.id, export.ExportOptions()).refined_used


def test_finer_maps_are_on_by_default_only_where_a_gpu_makes_them_cheap():
    from types import SimpleNamespace

    assert refinement.dense_by_default(SimpleNamespace(device="cuda:0"))
    assert not refinement.dense_by_default(SimpleNamespace(device="cpu"))


def test_cancel_and_resume_reuse_the_work_done(lab):
    ctx, run = lab
    if not any(c.label_name for c in mapping.list_clusters(ctx, run.id)):
        mapping.name_cluster(ctx, run.id, 0, "ground")
    job = refinement.start_refinement(ctx, run.id, dict(QUICK, steps=100_000))
    import time
    deadline = time.monotonic() + 120
    while refinement.get_refinement(ctx, job.id).stage != "training" and time.monotonic() < deadline:
        time.sleep(0.1)
    refinement.cancel_refinement(ctx, job.id)
    stopped = refinement.wait_for_refinement(ctx, job.id, timeout=120)
    assert stopped.status == "cancelled"
    assert refinement.refined_state(ctx, run.id).refinement_id != job.id   # earlier maps kept
    with pytest.raises(UserError, match="only queued, running or interrupted"):
        refinement.cancel_refinement(ctx, job.id)
    # a cancelled job resumes (here: with its stored settings; training starts again as no model was saved)
    resumed = refinement.resume_refinement(ctx, job.id)
    assert resumed.status == "queued"
    refinement.cancel_refinement(ctx, job.id)
    assert refinement.wait_for_refinement(ctx, job.id, timeout=120).status == "cancelled"


def test_a_refinement_stopped_under_an_older_version_resumes_without_inventing_class_counts(lab):
    """A job stopped before the app recorded the class counts (its space.json lacks them) resumes
    and says "(N classes)", not "0 named labels" (seen on a real job stopped under the older code)."""
    import json
    import time

    from stego_app.models import Refinement

    ctx, run = lab
    if not any(c.label_name for c in mapping.list_clusters(ctx, run.id)):
        mapping.name_cluster(ctx, run.id, 0, "ground")
    job = refinement.start_refinement(ctx, run.id, dict(QUICK, steps=100_000))
    space_json = RunDir(run.run_dir).refined_partial(job.id) / "space.json"
    deadline = time.monotonic() + 120
    while refinement.get_refinement(ctx, job.id).stage != "training" and time.monotonic() < deadline:
        time.sleep(0.1)
    refinement.cancel_refinement(ctx, job.id)
    assert refinement.wait_for_refinement(ctx, job.id, timeout=120).status == "cancelled"
    saved = json.loads(space_json.read_text())
    n_classes = len(saved["class_to_cluster"])
    space_json.write_text(json.dumps({k: v for k, v in saved.items() if k not in ("n_labels", "n_unnamed")}))
    with ctx.db.write() as s:                       # the older job, made short enough to finish here
        row = s.get(Refinement, job.id)
        row.params = dict(row.params, steps=QUICK["steps"])
    done = refinement.wait_for_refinement(ctx, refinement.resume_refinement(ctx, job.id).id, timeout=300)
    assert done.status == "done", done.error
    state = refinement.refined_state(ctx, run.id)
    assert state.refinement_id == job.id and not state.stale
    assert f"Refined maps of job {job.id} ({n_classes} classes)" in state.text
    assert "named label" not in state.text


def test_an_image_gone_bad_fails_the_job_naming_the_users_file(tmp_path):
    ctx, run = make_finished_run(tmp_path, n_images=3)
    try:
        mapping.name_cluster(ctx, run.id, 0, "ground")
        image = ingest.get_image(ctx, runs.run_images(ctx, run.id)[1].image_id)
        original = tmp_path / "original.png"
        original.write_bytes(image.path.read_bytes())
        image.path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))     # the stored copy goes bad
        job = refinement.start_refinement(ctx, run.id, QUICK)
        failed = refinement.wait_for_refinement(ctx, job.id, timeout=300)
        assert failed.status == "failed"
        assert f"image '{image.name}' (id {image.id}) cannot be read" in failed.error
        assert str(image.path) not in failed.error
        assert not refinement.refined_state(ctx, run.id).available       # no half-written maps offered
        assert mapping.list_clusters(ctx, run.id)[0].label_name == "ground"  # the naming is kept
        # the image is marked unreadable, a good copy replaces it, and the refinement resumes
        assert ingest.get_image(ctx, image.id).status == "error"
        report = ingest.ingest_files(ctx, image.project_id, [original])
        assert [i.id for i in report.added] == [image.id] and report.repaired
        refinement.resume_refinement(ctx, job.id)
        assert refinement.wait_for_refinement(ctx, job.id, timeout=300).status == "done"
        assert refinement.refined_state(ctx, run.id).available
    finally:
        ctx.close()
