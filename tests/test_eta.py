"""Elapsed and remaining time per stage and for the run; a resumed run's bar never goes back."""
from __future__ import annotations

import time

import pytest

from core.settings import AUTO_STEPS_HELP, RunSettings, auto_steps
from stego_app import eta, ingest, projects, runs
from stego_app.context import create_context
from stego_app.errors import UserError
from stego_app.worker import _Progress
from tests.test_runs import FAST, _config
from tests.conftest import write_scene_images

ORDER = ("a", "b", "c")
WEIGHTS = {"a": 0.5, "b": 0.25, "c": 0.25}


def test_running_stage_and_run_remaining_time():
    t = eta.estimate(ORDER, WEIGHTS, "b", 0.25, {"a": 100.0}, 10.0)
    assert [s.elapsed for s in t.stages] == [100.0, 10.0, None]
    assert t.stage("a").remaining == 0.0
    assert t.stage("b").remaining == pytest.approx(30.0)            # 10 s for a quarter
    # pace so far: (100 + 40) s for weight 0.75 -> stage c (0.25) about 46.7 s
    assert t.stage("c").remaining == pytest.approx(140 / 0.75 * 0.25)
    assert t.remaining == pytest.approx(30.0 + 140 / 0.75 * 0.25)
    assert t.elapsed == pytest.approx(110.0)
    # too early to say: unknown, not a wild guess
    assert eta.estimate(ORDER, WEIGHTS, "a", 0.001, {}, 5.0).remaining is None
    assert eta.estimate(ORDER, WEIGHTS, "a", 0.5, {}, 0.5).remaining is None
    assert eta.estimate(ORDER, WEIGHTS, "a", 0.001, {}, 12.0).stage("a").remaining == pytest.approx(11988.0)
    # not running: elapsed only
    done = eta.estimate(ORDER, WEIGHTS, None, 0.0, {"a": 1.0, "b": 2.0, "c": 3.0}, None)
    assert done.elapsed == 6.0 and done.remaining is None
    assert eta.clock(3725) == "1:02:05" and eta.clock(65) == "1:05" and eta.clock(None) == "?"
    assert eta.times_line(t, "b") == "b 0:10, about 0:30 left · run 1:50, about 1:17 left"


def test_a_stage_start_cost_is_not_taken_for_its_pace():
    """10 s of loading before the first report, then 1 % a second: the estimate is the steady rate."""
    steady = eta.estimate(ORDER, WEIGHTS, "a", 0.11, {}, 20.0, first=(0.01, 10.0))
    assert steady.stage("a").remaining == pytest.approx(89.0)
    from_start = eta.estimate(ORDER, WEIGHTS, "a", 0.11, {}, 20.0)
    assert from_start.stage("a").remaining > 160       # what the start-based rate said
    # right after the first report, or no progress since: not known yet
    assert eta.estimate(ORDER, WEIGHTS, "a", 0.02, {}, 11.0, first=(0.01, 10.0)).remaining is None
    assert eta.estimate(ORDER, WEIGHTS, "a", 0.01, {}, 60.0, first=(0.01, 10.0)).remaining is None
    # the worker records the first report; run_times reads it back from the live clock
    live = eta.live_clock("a", 20.0, now=1000.0, first=(0.01, 10.0))
    assert live == {"stage": "a", "stage_started": 980.0, "first_fraction": 0.01, "first_elapsed": 10.0}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("eta")
    ctx = create_context(_config(root / "data"))
    project = projects.create_project(ctx, "scenes")
    ingest.ingest_files(ctx, project.id, write_scene_images(root / "imgs", n=4))
    yield ctx, project
    ctx.close()


def test_live_times_of_a_running_run_and_resume_keeps_the_bar(lab):
    ctx, project = lab
    run = runs.start_run(ctx, project.id, RunSettings(steps=400, crf=False, **FAST))
    deadline = time.monotonic() + 300
    seen = None
    while time.monotonic() < deadline:
        info = runs.get_run(ctx, run.id)
        times = eta.run_times(info)
        st = times.stage("training")
        if info.stage == "training" and st and st.elapsed and st.elapsed > 2.5 and st.remaining is not None:
            seen = (info, times)
            break
        time.sleep(0.2)
    assert seen is not None, "no time estimate while training"
    info, times = seen
    assert times.stage("features").elapsed is not None and times.stage("features").remaining == 0.0
    assert times.remaining is not None and times.remaining >= times.stage("training").remaining
    assert times.stage("segments").remaining is not None and times.stage("segments").elapsed is None
    runs.cancel_run(ctx, run.id)
    stopped = runs.wait_for_run(ctx, run.id, timeout=120)
    assert stopped.status == "cancelled" and stopped.progress > 0.3
    assert stopped.timings.get("training", 0) > 2.5     # kept for the next attempt

    # what the worker writes at the start of the resumed attempt: never below where it stopped
    prog = _Progress(ctx.db, run.id, False, 0.0, stopped.progress, stopped.timings)
    prog("features", 0.0, {})
    assert runs.get_run(ctx, run.id).progress == pytest.approx(stopped.progress)
    prog("features", 1.0, {"skipped": True})
    prog("knn", 1.0, {"skipped": True})
    prog("training", 0.01, {"step": 4})
    again = runs.get_run(ctx, run.id)
    assert again.progress >= stopped.progress - 1e-9          # never back (forward once past it)
    assert again.timings["training"] == pytest.approx(stopped.timings["training"], abs=0.5)
    live = again.metrics[eta.LIVE_KEY]                         # the pace is measured from here
    assert live["first_fraction"] == pytest.approx(0.01)
    assert live["first_elapsed"] == pytest.approx(stopped.timings["training"], abs=0.5)
    prog.close()


def test_default_steps_scale_with_the_corpus(lab):
    """No steps given: 6 per training item, 50..2000, and the run records the number it used."""
    ctx, project = lab
    assert [auto_steps(n) for n in (2, 10, 40, 100, 367, 5000)] == [50, 60, 240, 600, 2000, 2000]
    assert RunSettings().steps is None
    run = runs.start_run(ctx, project.id, RunSettings(crf=False, **FAST))
    assert run.params.steps == 50                       # 4 images
    five = runs.start_run(ctx, project.id, RunSettings(crf=False, crop_mode="five", **FAST))
    assert five.params.steps == auto_steps(4 * 5) == 120
    mine = runs.start_run(ctx, project.id, RunSettings(steps=7, crf=False, **FAST))
    assert mine.params.steps == 7
    for r in (run, five, mine):          # tidy up; a fast machine may have finished one already
        try:
            runs.cancel_run(ctx, r.id)
        except UserError:
            assert runs.get_run(ctx, r.id).status == "done"
        runs.wait_for_run(ctx, r.id, timeout=120)
    assert "6 per training item" in AUTO_STEPS_HELP and "between 50 and 2000" in AUTO_STEPS_HELP
