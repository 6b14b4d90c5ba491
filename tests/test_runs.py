"""Pipeline runs through the service layer: real StegoPipeline (test_tiny backbone), background
worker, progress visible from elsewhere, cancel/resume, crashes and killed processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from core.settings import RunSettings
from stego_app import ingest, projects, runs
from stego_app.labels import mapping, views
from stego_app.config import AppConfig
from stego_app.context import create_context
from stego_app.errors import NotFound, UserError
from tests.conftest import write_scene_images

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(backbone="test_tiny", resolution=32, n_clusters=3, batch_size=4, code_dim=8)


def _config(data_dir: Path, worker: bool = True) -> AppConfig:
    return AppConfig(data_dir=data_dir, worker=worker, demo=False, backbone="test_tiny", device="cpu",
                     pipeline_jobs=1)


def _wait(predicate, timeout: float = 120.0, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError("timed out waiting")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A context with a worker, a project of 4 images and one finished run (CRF on)."""
    root = tmp_path_factory.mktemp("runs")
    ctx = create_context(_config(root / "data"))
    project = projects.create_project(ctx, "scenes")
    ingest.ingest_files(ctx, project.id, write_scene_images(root / "imgs", n=4))
    first = runs.start_run(ctx, project.id, RunSettings(steps=10, crf=True, **FAST))
    done = runs.wait_for_run(ctx, first.id, timeout=300)
    assert done.status == "done", done.error
    yield ctx, project, done
    ctx.close()


def test_finished_run_is_stored_with_its_clusters(lab):
    ctx, project, run = lab
    assert run.progress == 1.0 and run.stage is None and run.error is None
    assert run.backbone == "test_tiny" and "random init" in (run.weights_source or "")
    assert run.params.n_clusters == 3 and run.params.steps == 10
    assert {"features", "training", "segments", "crf"} <= set(run.timings)
    assert run.history and "loss" in run.history[-1] and run.history[-1]["step"] == 10
    assert run.metrics["n_images"] == 4 and run.started_at <= run.finished_at
    assert (run.run_dir / "clusters.json").is_file() and run.run_dir == ctx.config.runs_dir / str(run.id)
    clusters = mapping.list_clusters(ctx, run.id)
    assert [c.index for c in clusters] == [0, 1, 2]
    assert sum(c.share for c in clusters) == pytest.approx(1.0, abs=1e-3)
    image_ids = {i.id for i in ingest.list_images(ctx, project.id)}
    assert all(set(c.example_image_ids) <= image_ids for c in clusters)
    assert [r.id for r in runs.list_runs(ctx, project.id)][-1] == run.id
    items = runs.run_images(ctx, run.id)
    assert [i.position for i in items] == [0, 1, 2, 3] and {i.image_id for i in items} == image_ids
    view = views.render_segmentation(ctx, run.id, items[0].image_id, crf=True)
    assert view.crf and view.segmentation.shape == (48, 64) and view.overlay.shape == (48, 64, 3)
    assert set(np.unique(view.segmentation)) <= {0, 1, 2}


def test_progress_is_visible_elsewhere_and_cancel_resume(lab):
    ctx, project, first = lab
    other = create_context(_config(ctx.config.data_dir, worker=False))   # a second process/tab
    try:
        run = runs.start_run(ctx, project.id, RunSettings(steps=1500, crf=False, seed=1, **FAST))
        queued = runs.start_run(ctx, project.id, RunSettings(steps=5, crf=False, seed=2, **FAST))
        assert runs.cancel_run(other, queued.id).status == "cancelled"       # never started
        seen = _wait(lambda: (lambda i: i if i.stage == "training" and i.progress > 0.35 else None)(
            runs.get_run(other, run.id)))
        assert seen.status == "running" and 0 < seen.progress < 1 and 0 <= seen.stage_progress < 1
        assert runs.cancel_run(other, run.id).cancel_requested        # via the database flag
        stopped = runs.wait_for_run(ctx, run.id, timeout=120)
        assert stopped.status == "cancelled" and stopped.is_resumable
        with pytest.raises(UserError, match="only queued, running or interrupted"):
            runs.cancel_run(ctx, run.id)
        resumed = runs.resume_run(ctx, run.id)
        assert resumed.status == "queued"
        done = runs.wait_for_run(ctx, run.id, timeout=300)
        assert done.status == "done", done.error
        assert len(mapping.list_clusters(ctx, run.id)) == 3
        assert runs.get_run(ctx, queued.id).status == "cancelled"
        assert runs.get_run(ctx, queued.id).started_at is None
        # the feature cache of the first attempt was reused, not extracted again
        assert len([d for d in (ctx.config.feature_cache_dir).iterdir() if d.is_dir()]) == 1
        with pytest.raises(UserError, match="only interrupted, failed or cancelled"):
            runs.resume_run(ctx, run.id)
        assert runs.get_run(ctx, first.id).status == "done"
    finally:
        other.close()


def test_crash_marks_the_run_failed_and_keeps_earlier_work(lab, tmp_path):
    ctx, project, first = lab
    mapping.name_cluster(ctx, first.id, 0, "sky")
    before = mapping.list_clusters(ctx, first.id)
    original = write_scene_images(tmp_path, n=1, seed=7)[0]
    extra = ingest.ingest_files(ctx, project.id, [original]).added[0]
    extra.path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))     # the disk copy goes bad later
    run = runs.start_run(ctx, project.id, RunSettings(steps=5, crf=False, **FAST))
    failed = runs.wait_for_run(ctx, run.id, timeout=300)
    assert failed.status == "failed"
    # named as the user knows it (file name and id), not by the stored copy's path
    assert f"image '{extra.name}' (id {extra.id}) cannot be read" in failed.error
    assert "ImageLoadError" in failed.error and str(extra.path) not in failed.error
    assert failed.is_resumable
    assert runs.get_run(ctx, first.id).status == "done"
    assert mapping.list_clusters(ctx, first.id) == before
    view = views.render_segmentation(ctx, first.id, runs.run_images(ctx, first.id)[0].image_id)
    assert "sky" in {e.name for e in view.legend} or view.legend
    # the unreadable image is marked; the next run leaves it out
    bad = ingest.get_image(ctx, extra.id)
    assert bad.status == "error" and bad.error
    nxt = runs.start_run(ctx, project.id, RunSettings(steps=2, crf=False, **FAST))
    assert nxt.n_images == 4 and extra.id not in {i.image_id for i in runs.run_images(ctx, nxt.id)}
    assert runs.wait_for_run(ctx, nxt.id, timeout=300).status == "done"   # the worker survived the crash
    # what the message says to do works: a good copy replaces the stored one (same image, same id),
    # and the failed run resumes over it
    report = ingest.ingest_files(ctx, project.id, [original], ["good copy.png"])
    assert [i.id for i in report.added] == [extra.id] and report.repaired == [extra.name]
    assert not report.duplicates and "1 replacing an unreadable copy" in report.summary()
    assert ingest.get_image(ctx, extra.id).status == "ok"
    assert ingest.ingest_files(ctx, project.id, [original]).duplicates      # once good, a duplicate again
    runs.resume_run(ctx, run.id)
    assert runs.wait_for_run(ctx, run.id, timeout=300).status == "done"


def test_start_run_refuses_bad_requests(lab, app_ctx):
    ctx, project, _ = lab
    with pytest.raises(UserError, match="unknown backbone"):
        runs.start_run(ctx, project.id, RunSettings(backbone="resnet9000"))
    with pytest.raises(UserError, match="Crop mode"):
        runs.start_run(ctx, project.id, RunSettings(crop_mode="ten"))
    with pytest.raises(UserError, match="CRF resolution"):
        runs.start_run(ctx, project.id, RunSettings(crf_resolution=-5))
    with pytest.raises(NotFound):
        runs.start_run(ctx, 999)
    lonely = projects.create_project(ctx, "lonely")
    with pytest.raises(UserError, match="at least 2 readable images"):
        runs.start_run(ctx, lonely.id, RunSettings(**FAST))
    with pytest.raises(UserError, match="no run worker"):
        runs.start_run(app_ctx, 1)
    with pytest.raises(NotFound):
        runs.get_run(ctx, 12345)


CHILD = textwrap.dedent("""
    import sys, time
    from stego_app.config import AppConfig
    from stego_app.context import create_context
    from core.settings import RunSettings
    from stego_app import runs
    ctx = create_context(AppConfig(data_dir=sys.argv[1], demo=False, backbone="test_tiny", device="cpu",
                                   pipeline_jobs=1))
    r = runs.start_run(ctx, int(sys.argv[2]), RunSettings(
        backbone="test_tiny", resolution=32, n_clusters=3, batch_size=4, code_dim=8, steps=150, crf=False))
    print(r.id, flush=True)
    time.sleep(600)
""")


def test_run_of_a_killed_process_is_interrupted_and_resumable(tmp_path):
    data = tmp_path / "data"
    ctx = create_context(_config(data, worker=False))
    project = projects.create_project(ctx, "p")
    ingest.ingest_files(ctx, project.id, write_scene_images(tmp_path / "imgs", n=3))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(data), str(project.id)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        run_id = int(child.stdout.readline())
        _wait(lambda: runs.get_run(ctx, run_id).stage == "training", timeout=180)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert runs.get_run(ctx, run_id).status == "running"      # nobody has noticed yet
    ctx.close()

    ctx = create_context(_config(data))                         # the app starts again
    try:
        info = runs.get_run(ctx, run_id)
        assert info.status == "interrupted" and "resume" in info.error
        # the run's own directory keeps the stages finished before the kill
        assert (info.run_dir / "state.json").is_file()
        runs.resume_run(ctx, run_id)
        done = runs.wait_for_run(ctx, run_id, timeout=300)
        assert done.status == "done", done.error
        assert done.history[-1]["step"] == 150
        assert len(mapping.list_clusters(ctx, run_id)) == 3
    finally:
        ctx.close()


def test_shutdown_leaves_a_running_run_interrupted(tmp_path):
    ctx = create_context(_config(tmp_path / "data"))
    project = projects.create_project(ctx, "p")
    ingest.ingest_files(ctx, project.id, write_scene_images(tmp_path / "imgs", n=2))
    run = runs.start_run(ctx, project.id, RunSettings(steps=400, crf=False, **FAST))
    _wait(lambda: runs.get_run(ctx, run.id).stage == "training", timeout=180)
    ctx.close()
    ctx = create_context(_config(tmp_path / "data", worker=False))
    try:
        info = runs.get_run(ctx, run.id)
        assert info.status == "interrupted" and info.is_resumable
    finally:
        ctx.close()


def test_segment_png_size_matches_the_image(lab):
    ctx, _, run = lab
    for item in runs.run_images(ctx, run.id):
        with PILImage.open(run.run_dir / "segments" / f"{item.position:06d}.png") as im:
            assert im.size == (item.width, item.height)


def test_backbone_choices_offer_the_paper_backbones_and_hide_test_ones(lab, tmp_path):
    ctx, _, _ = lab
    values = [v for _, v in runs.backbone_choices(ctx)]
    assert values[0] == ""                                   # automatic comes first
    assert {"dino_vits8", "dino_vitb8", "dinov2_vits14", "dinov2_vitb14"} <= set(values)
    assert "test_tiny" in values                             # configured here, so offered
    plain = create_context(AppConfig(data_dir=tmp_path / "plain", demo=False, worker=False))
    try:
        assert "test_tiny" not in [v for _, v in runs.backbone_choices(plain)]
        assert runs.backbone_choices(plain)[0][0] == "Automatic: best available"
    finally:
        plain.close()


def test_runs_average_with_the_flipped_image_only_when_asked(lab):
    """Averaging codes with the h-flipped image doubles feature time: off unless --flip (or the form) asks."""
    import json

    from stego_app.worker import build_pipeline_config
    ctx, _, first = lab
    saved = json.loads((first.run_dir / "config.json").read_text())
    assert saved["features"]["flip"] is False                   # the default: half the feature time
    on = build_pipeline_config(RunSettings(flip=True, steps=5, **FAST), "test_tiny", ctx.config)
    assert on.features.flip is True


def test_a_second_identical_start_is_refused_while_the_first_is_active(lab):
    """A double click on Start discovery (or a second tab) must not queue the same training twice."""
    ctx, project, _ = lab
    settings = RunSettings(steps=1500, crf=False, seed=11, **FAST)
    first = runs.start_run(ctx, project.id, settings)
    try:
        with pytest.raises(UserError, match=f"run {first.id} with the same settings on these .* is already"):
            runs.start_run(ctx, project.id, settings)
        other = runs.start_run(ctx, project.id, settings.replace(seed=12))     # another setting: allowed
        runs.cancel_run(ctx, other.id)
    finally:
        runs.cancel_run(ctx, first.id)
    runs.wait_for_run(ctx, first.id, timeout=120)
    again = runs.start_run(ctx, project.id, settings)          # once the first is over, it may run again
    runs.cancel_run(ctx, again.id)
    runs.wait_for_run(ctx, again.id, timeout=120)


def test_a_worker_killed_for_memory_fails_the_run_with_words_a_person_can_act_on():
    from concurrent.futures.process import BrokenProcessPool

    from stego_app import jobs

    text = jobs.failure_text(None, 1, BrokenProcessPool("A process in the process pool was terminated abruptly"))
    assert text.startswith("a worker process stopped abruptly, most often because the machine ran out of memory")
    assert "STEGO_PIPELINE_JOBS=1" in text and "Resume to try again" in text and "BrokenProcessPool" in text
