"""Pipeline runs: start, cancel, resume, read progress.

A run is a fixed, ordered list of a project's images (RunImage.position i is
segments/{i:06d}.png) plus every hyper-parameter (RunParams). The work itself is
done by stego_app.worker.RunWorker in a background thread.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from sqlalchemy import select, update

from core.constants import CROP_MODES
from stego_app.db import as_utc, lock_for_update
from stego_app.errors import NotFound, UserError
from stego_app.models import (IMAGE_ERROR, IMAGE_OK, RUN_ACTIVE, RUN_CANCELLED, RUN_DONE,
                              RUN_INTERRUPTED, RUN_QUEUED, RUN_RESUMABLE, RUN_RUNNING, Image, Project, Run,
                              RunImage, utcnow)

log = logging.getLogger(__name__)

MIN_IMAGES = 2
# Automatic training length: small corpora need far fewer steps (a first look at 10 images
# takes about a minute on a busy 2-core CPU); the cap is the old fixed default.
AUTO_STEPS_PER_ITEM, AUTO_STEPS_MIN, AUTO_STEPS_MAX = 5, 50, 500


def auto_steps(n_items: int) -> int:
    """Training steps chosen for `n_items` training items (images, or 5 per image with five crops)."""
    return int(min(AUTO_STEPS_MAX, max(AUTO_STEPS_MIN, AUTO_STEPS_PER_ITEM * int(n_items))))


AUTO_STEPS_HELP = (f"empty = automatic: {AUTO_STEPS_PER_ITEM} per image (per crop with five crops), "
                   f"between {AUTO_STEPS_MIN} and {AUTO_STEPS_MAX}")


@dataclass
class RunParams:
    """Every hyper-parameter of a run (stored as a dict in Run.params)."""

    backbone: str | None = None          # None = AppConfig.backbone, else the best available
    resolution: int = 224
    n_clusters: int = 40                 # over-clustering: well above the classes a person expects (issue 12)
    crop_mode: str = "none"
    flip: bool = True                    # average codes with the h-flipped image (paper's inference)
    crf: bool = True
    crf_resolution: int | None = None    # short side the CRF runs at; None = resolution, 0 = full size
    steps: int | None = None             # None = automatic: auto_steps(number of training items)
    batch_size: int = 16
    code_dim: int = 70
    lr: float = 5e-4
    shift_self: float | None = None      # None = automatic
    shift_knn: float | None = None
    shift_neg: float | None = None
    weight_self: float = 0.67
    weight_knn: float = 0.25
    weight_neg: float = 0.63
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunParams":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_form(cls, values: Mapping[str, Any]) -> "RunParams":
        """Build RunParams from form values: blank numbers mean the default (None = automatic).

        Integer fields are rounded from the float a gr.Number gives; a value that is not a
        number raises UserError naming the field.
        """
        defaults = cls()
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            default = getattr(defaults, f.name)
            if isinstance(v, str):
                v = v.strip()
                if v == "" or v.lower() in ("auto", "default"):
                    v = None
            if v is None:
                kwargs[f.name] = default
                continue
            try:
                if isinstance(default, bool):
                    kwargs[f.name] = bool(v)
                elif isinstance(default, int) or str(f.type).startswith("int"):
                    kwargs[f.name] = int(round(float(v)))
                elif isinstance(default, float) or f.name.startswith("shift_"):
                    kwargs[f.name] = float(v)
                else:
                    kwargs[f.name] = v
            except (TypeError, ValueError):
                raise UserError(f"{f.name.replace('_', ' ')}: {v!r} is not a number") from None
        return cls(**kwargs)

    def validate(self) -> None:
        """Raise UserError naming the first bad value."""
        def bad(msg: str) -> None:
            raise UserError(f"invalid run setting: {msg}")

        if not 28 <= self.resolution <= 2048:
            bad(f"resolution {self.resolution} must be between 28 and 2048")
        if self.crf_resolution is not None and not 0 <= self.crf_resolution <= 16384:
            bad(f"CRF resolution {self.crf_resolution} must be between 0 (full size) and 16384")
        if not 2 <= self.n_clusters <= 128:
            bad(f"number of clusters {self.n_clusters} must be between 2 and 128")
        if self.crop_mode not in CROP_MODES:
            bad(f"crop mode {self.crop_mode!r} must be one of {', '.join(CROP_MODES)}")
        if self.steps is not None and not 0 <= self.steps <= 1_000_000:
            bad(f"steps {self.steps} must be between 0 and 1,000,000")
        if not 1 <= self.batch_size <= 4096:
            bad(f"batch size {self.batch_size} must be between 1 and 4096")
        if not 2 <= self.code_dim <= 4096:
            bad(f"code dimension {self.code_dim} must be between 2 and 4096")
        if not 0 < self.lr < 1:
            bad(f"learning rate {self.lr} must be between 0 and 1")
        for name in ("weight_self", "weight_knn", "weight_neg"):
            if getattr(self, name) < 0:
                bad(f"{name} must not be negative")
        if self.backbone is not None:
            try:
                from core.registry import list_backbones
            except ImportError:  # the registry is checked again when the run starts
                return
            if self.backbone not in list_backbones():
                bad(f"unknown backbone {self.backbone!r}; choose one of {', '.join(list_backbones())}")


@dataclass(frozen=True)
class RunInfo:
    id: int
    project_id: int
    status: str
    stage: str | None
    stage_progress: float
    progress: float
    params: RunParams
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
                   params=RunParams.from_dict(run.params or {}), backbone=run.backbone,
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


def start_run(ctx, project_id: int, params: RunParams | None = None) -> RunInfo:
    """Queue a run over every readable image of the project."""
    params = params or RunParams()
    params.validate()
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
            params = replace(params, steps=auto_steps(items))
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
        if run.status in (RUN_QUEUED, RUN_INTERRUPTED):
            run.status, run.finished_at = RUN_CANCELLED, utcnow()
        elif run.status == RUN_RUNNING:
            run.cancel_requested = True
        else:
            raise UserError(f"run {run_id} is {run.status}; only queued or running runs can be cancelled")
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
        if run.status not in RUN_RESUMABLE:
            raise UserError(f"run {run_id} is {run.status}; only interrupted, failed or cancelled "
                            "runs can be resumed")
        missing = [ri.image.name for ri in run.images if not Path(ri.image.path).is_file()]
        if missing:
            raise UserError(f"cannot resume run {run_id}: {len(missing)} image file(s) are missing, "
                            f"e.g. {missing[0]}")
        run.status, run.cancel_requested, run.error = RUN_QUEUED, False, None
        run.owner, run.finished_at, run.heartbeat_at = worker.owner, None, utcnow()
        s.flush()
        info = run_info(run)
    worker.submit(run_id)
    log.info("run %s queued again (resume)", run_id)
    return info


def wait_for_run(ctx, run_id: int, timeout: float | None = None, poll: float = 0.2) -> RunInfo:
    """Block until the run is no longer queued/running (or the timeout passes)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = get_run(ctx, run_id)
        if not info.is_active or (deadline is not None and time.monotonic() >= deadline):
            return info
        time.sleep(poll)


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
    with db.write() as s:
        rows = s.scalars(select(Run).where(Run.status.in_(RUN_ACTIVE))).all()
        dead = [r.id for r in rows if not is_alive(r.owner, as_utc(r.heartbeat_at))]
        if dead:
            s.execute(update(Run).where(Run.id.in_(dead)).values(
                status="interrupted", owner=None, cancel_requested=False,
                error="the app stopped while this run was queued or running; resume it to continue"))
    for run_id in dead:
        log.warning("run %s was left unfinished by a stopped process: marked interrupted", run_id)
    return dead
