"""Pipeline runs: start, cancel, resume, read progress.

A run is a fixed, ordered list of a project's images (RunImage.position i is
segments/{i:06d}.png) plus every hyper-parameter (core.settings.RunSettings). The work itself is
done by stego_app.worker.RunWorker in a background thread.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from sqlalchemy import select

from core.settings import RunSettings, SettingsError, auto_steps
from stego_app import jobs
from stego_app.db import as_utc, lock_for_update
from stego_app.errors import NotFound, UserError
from stego_app.models import (IMAGE_ERROR, IMAGE_OK, RUN_ACTIVE, RUN_CANCELLABLE, RUN_DONE, RUN_QUEUED,
                              RUN_RESUMABLE, Image, Project, Run, RunImage, utcnow)

log = logging.getLogger(__name__)

MIN_IMAGES = 2


def validated(settings: RunSettings) -> RunSettings:
    """``settings`` checked against the schema's limits; UserError names the bad value."""
    try:
        return settings.validate()
    except SettingsError as exc:
        raise UserError(f"invalid run setting: {exc}") from None


def parse_form(values: Mapping[str, Any]) -> RunSettings:
    """RunSettings from form values (blank = default/automatic); UserError for a non-number."""
    try:
        return RunSettings.parse(values)
    except SettingsError as exc:
        raise UserError(str(exc)) from None


@dataclass(frozen=True)
class RunInfo:
    id: int
    project_id: int
    status: str
    stage: str | None
    stage_progress: float
    progress: float
    params: RunSettings
    backbone: str | None
    weights_source: str | None
    run_dir: Path
    n_images: int
    history: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    cancel_requested: bool = False
    mapping_version: int = 0
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def is_active(self) -> bool:
        return self.status in RUN_ACTIVE

    @property
    def is_resumable(self) -> bool:
        return self.status in RUN_RESUMABLE

    @property
    def is_cancellable(self) -> bool:
        return self.status in RUN_CANCELLABLE


@dataclass(frozen=True)
class RunImageInfo:
    position: int
    image_id: int
    name: str
    width: int
    height: int
    confirmed: bool


def run_info(run: Run) -> RunInfo:
    return RunInfo(id=run.id, project_id=run.project_id, status=run.status, stage=run.stage,
                   stage_progress=float(run.stage_progress or 0.0), progress=float(run.progress or 0.0),
                   params=RunSettings.from_dict(run.params or {}), backbone=run.backbone,
                   weights_source=run.weights_source, run_dir=Path(run.run_dir), n_images=run.n_images,
                   history=list(run.history or []), timings=dict(run.timings or {}),
                   metrics=dict(run.metrics or {}), error=run.error,
                   cancel_requested=bool(run.cancel_requested), mapping_version=run.mapping_version,
                   created_at=as_utc(run.created_at), started_at=as_utc(run.started_at),
                   finished_at=as_utc(run.finished_at))


def _worker(ctx):
    worker = getattr(ctx, "worker", None)
    if worker is None:
        raise UserError("this process has no run worker; start the app or use `app.py run`")
    return worker


def backbone_choices(ctx) -> list[tuple[str, str]]:
    """(label, value) pairs for a backbone picker; value "" means automatic.

    Test backbones are offered only when the server is configured to use one.
    """
    from core.registry import BACKBONES, list_backbones

    configured = ctx.config.backbone
    auto = (f"Automatic: {configured} (server setting)" if configured
            else "Automatic: best available")
    names = [n for n in list_backbones() if BACKBONES[n].family != "test" or n == configured]
    return [(auto, "")] + [(f"{n} · {BACKBONES[n].description}" if BACKBONES[n].description else n, n)
                           for n in names]


def start_run(ctx, project_id: int, params: RunSettings | None = None) -> RunInfo:
    """Queue a run over every readable image of the project (every setting is stored with it)."""
    params = validated(params or RunSettings())
    worker = _worker(ctx)
    with ctx.db.write() as s:
        project = s.get(Project, project_id)
        if project is None:
            raise NotFound(f"project {project_id} does not exist")
        images = s.scalars(select(Image).where(Image.project_id == project_id, Image.status == IMAGE_OK)
                           .order_by(Image.id)).all()
        usable = []
        for img in images:
            if Path(img.path).is_file():
                usable.append(img)
            else:  # a referenced server file went away
                img.status, img.error = IMAGE_ERROR, f"file missing: {img.path}"
                log.warning("image %s (%s) is missing; left out of the run", img.id, img.path)
        if len(usable) < MIN_IMAGES:
            raise UserError(f"a run needs at least {MIN_IMAGES} readable images; "
                            f"project {project.name!r} has {len(usable)}")
        if params.steps is None:          # scaled with the corpus; the run records the number used
            items = len(usable) * (5 if params.crop_mode == "five" else 1)
            params = params.replace(steps=auto_steps(items))
        same = s.scalars(select(Run).where(Run.project_id == project_id, Run.status.in_(RUN_ACTIVE),
                                           Run.n_images == len(usable)).order_by(Run.id)).all()
        wanted = json.loads(json.dumps(params.to_dict()))          # as stored (tuples become lists)
        twin = next((r for r in same if r.params == wanted), None)
        if twin is not None:               # a double click, or a second tab, must not train twice
            raise UserError(f"run {twin.id} with the same settings on these {len(usable)} images is already "
                            f"{twin.status}; wait for it or cancel it, or change a setting to start another")
        run = Run(project_id=project_id, status=RUN_QUEUED, params=params.to_dict(),
                  backbone=params.backbone, n_images=len(usable), owner=worker.owner,
                  heartbeat_at=utcnow(), history=[], timings={}, metrics={})
        s.add(run)
        s.flush()
        run.run_dir = str(ctx.config.runs_dir / str(run.id))
        for pos, img in enumerate(usable):
            s.add(RunImage(run_id=run.id, position=pos, image_id=img.id))
        s.flush()
        info = run_info(run)
    worker.submit(info.id)
    log.info("run %s queued for project %s (%d images)", info.id, project_id, info.n_images)
    return info


def get_run(ctx, run_id: int) -> RunInfo:
    with ctx.db.read() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} does not exist")
        return run_info(run)


def list_runs(ctx, project_id: int) -> list[RunInfo]:
    """The project's runs, newest first."""
    with ctx.db.read() as s:
        if s.get(Project, project_id) is None:
            raise NotFound(f"project {project_id} does not exist")
        rows = s.scalars(select(Run).where(Run.project_id == project_id).order_by(Run.id.desc())).all()
        return [run_info(r) for r in rows]


def latest_done_run(ctx, project_id: int) -> RunInfo | None:
    with ctx.db.read() as s:
        row = s.scalars(select(Run).where(Run.project_id == project_id, Run.status == RUN_DONE)
                        .order_by(Run.id.desc()).limit(1)).first()
        return run_info(row) if row is not None else None


def cancel_run(ctx, run_id: int) -> RunInfo:
    """Stop a run: a queued or interrupted one at once, a running one at its next check."""
    with ctx.db.write() as s:
        run = lock_for_update(s, Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} does not exist")
        jobs.cancel(run, f"run {run_id}", "runs")
        s.flush()
        info = run_info(run)
    worker = getattr(ctx, "worker", None)
    if worker is not None:
        worker.request_cancel(run_id)
    return info


def resume_run(ctx, run_id: int) -> RunInfo:
    """Queue an interrupted, failed or cancelled run again; finished stages are reused."""
    worker = _worker(ctx)
    with ctx.db.write() as s:
        run = lock_for_update(s, Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} does not exist")
        jobs.check_resumable(run, f"run {run_id}", "runs")
        missing = [ri.image.name for ri in run.images if not Path(ri.image.path).is_file()]
        if missing:
            raise UserError(f"cannot resume run {run_id}: {len(missing)} image file(s) are missing, "
                            f"e.g. {missing[0]}")
        jobs.requeue(run, worker.owner)
        s.flush()
        info = run_info(run)
    worker.submit(run_id)
    log.info("run %s queued again (resume)", run_id)
    return info


def wait_for_run(ctx, run_id: int, timeout: float | None = None, poll: float = 0.2) -> RunInfo:
    """Block until the run is no longer queued/running (or the timeout passes)."""
    return jobs.wait(lambda: get_run(ctx, run_id), timeout, poll)


def run_images(ctx, run_id: int) -> list[RunImageInfo]:
    """The run's images in pipeline order."""
    with ctx.db.read() as s:
        if s.get(Run, run_id) is None:
            raise NotFound(f"run {run_id} does not exist")
        rows = s.execute(select(RunImage, Image).join(Image, RunImage.image_id == Image.id)
                         .where(RunImage.run_id == run_id).order_by(RunImage.position)).all()
        return [RunImageInfo(position=ri.position, image_id=img.id, name=img.name, width=img.width,
                             height=img.height, confirmed=ri.confirmed) for ri, img in rows]


def mark_interrupted(db, is_alive) -> list[int]:
    """Runs queued/running under a worker that no longer exists become 'interrupted'."""
    dead = jobs.mark_interrupted(db, Run, is_alive, "the app stopped while this run was queued or running; "
                                                     "resume it to continue")
    for run_id in dead:
        log.warning("run %s was left unfinished by a stopped process: marked interrupted", run_id)
    return dead
