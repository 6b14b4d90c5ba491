"""Refine with names: propagation jobs of finished runs (background, cancellable, resumable).

After a person has named clusters, ``start_refinement`` queues a job on the run worker. The
job (core.refinement.refine) trains a pixel classifier on the run's cached backbone features
from the named clusters' confident pixels, person-checked images (seeds) and found regions,
predicts every image, refines with the CRF and writes refined maps. They are built in
``run_dir/segments_refined.partial/<job id>/`` and replace ``run_dir/segments_refined/`` only when complete, so
running it again after more naming swaps in the new maps at the end and the old ones stay
usable meanwhile. Overlays and exports use refined maps when present (stego_app.segmaps).

What the propagator learns (the class space): one class per label (written as the label's
lowest cluster index), one per unnamed cluster (itself), one for all ignored clusters; so
the refined maps live in cluster-index space and later naming still applies to them.
``refined_state`` says whether the maps are stale (``stale_reasons``: the names changed, or corrections
were imported, since they were made); exports record the same reasons.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from sqlalchemy import select, update

from core.atomic import atomic_write_json
from core.refinement import SPACE, ClassSpace, RefineConfig, correction_seeds
from core.rundir import FeaturesMissing, RunDir
from stego_app import corrections, jobs, segmaps
from stego_app.db import as_utc, lock_for_update
from stego_app.errors import NotFound, UserError
from stego_app.labels import mapping
from stego_app.models import (
    RUN_ACTIVE,
    RUN_CANCELLABLE,
    RUN_CANCELLED,
    RUN_DONE,
    RUN_FAILED,
    RUN_INTERRUPTED,
    RUN_QUEUED,
    RUN_RESUMABLE,
    RUN_RUNNING,
    Image,
    Refinement,
    Run,
    RunImage,
    utcnow,
)

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.5
CANCEL_POLL = 1.0
STAGE_WORDS = {"pseudo-labels": "Collecting named pixels", "training": "Training the pixel classifier",
               "maps": "Predicting and refining every image"}


@dataclass(frozen=True)
class RefinementInfo:
    id: int
    run_id: int
    status: str                    # queued | running | done | failed | cancelled | interrupted
    stage: str | None              # core.refinement.STAGES while running
    progress: float                # 0..1
    mapping_version: int           # the naming it uses
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    cancel_requested: bool = False
    created_at: datetime | None = None
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


def stale_reasons(maps_version: int | None, current_version: int, pending: int) -> tuple[str, ...]:
    """Why the maps a run shows and exports are not the run as it is now (empty: they are), as
    sentences for the refine status, the CLI and export warnings. ``maps_version``: the naming the
    refined maps in use were made with (None: none are used); ``pending``: checked images whose
    imported corrections those maps (or the raw ones) do not hold."""
    out = []
    if maps_version is not None and maps_version != current_version:
        out.append("the refined maps were made before the latest naming changes; refine with names again "
                   "to propagate the new names")
    if pending:
        many = pending != 1
        out.append(f"{pending} image{'s' if many else ''} with imported corrections {'show' if many else 'shows'} "
                   f"as predicted, not as corrected; refine with names again to write the corrections into the maps")
    return tuple(out)


@dataclass(frozen=True)
class RefinedState:
    available: bool                # complete refined maps exist
    refinement_id: int | None
    mapping_version: int | None    # naming the maps were made with
    current_version: int           # the run's naming now
    n_classes: int | None
    dense: bool = False            # predicted on the finer token grid
    corrections_pending: int = 0   # checked images whose corrections are not in the maps yet
    n_labels: int | None = None    # of the classes: named labels, then unnamed clusters (None: maps made
    n_unnamed: int | None = None   # before the app recorded these counts)

    @property
    def classes_text(self) -> str:
        """What the maps' classes are, in a person's words."""
        # unknown counts: maps made before they were recorded, or (0 labels: no refinement starts without
        # a name) by a job resumed from such an older one under the version that first wrote them
        if not self.n_labels or self.n_unnamed is None:
            return f"{self.n_classes} classes"
        parts = [f"{self.n_labels} named label{'s' if self.n_labels != 1 else ''}"]
        if self.n_unnamed:
            parts.append(f"{self.n_unnamed} unnamed cluster{'s' if self.n_unnamed != 1 else ''} kept as "
                         f"{'their own classes' if self.n_unnamed != 1 else 'its own class'}")
        if (self.n_classes or 0) > self.n_labels + self.n_unnamed:
            parts.append("the ignored clusters as one class")
        return ", ".join(parts)

    @property
    def stale_reasons(self) -> tuple[str, ...]:
        return stale_reasons(self.mapping_version if self.available else None, self.current_version,
                             self.corrections_pending)

    @property
    def stale(self) -> bool:
        """The maps exist but do not show the run as it is now (names or corrections changed since)."""
        return self.available and bool(self.stale_reasons)

    @property
    def text(self) -> str:
        reasons = " ".join(r[0].upper() + r[1:] + "." for r in self.stale_reasons)
        if not self.available:
            return " ".join(["No refined maps yet: name clusters, then refine with names.", reasons]).strip()
        base = (f"Refined maps of job {self.refinement_id} ({self.classes_text}"
                + ("; finer maps" if self.dense else "") + ")")
        return f"{base}. {reasons}" if reasons else f"{base}: up to date with the names."


def _info(row: Refinement) -> RefinementInfo:
    return RefinementInfo(id=row.id, run_id=row.run_id, status=row.status, stage=row.stage,
                          progress=float(row.progress or 0.0), mapping_version=row.mapping_version,
                          params=dict(row.params or {}), metrics=dict(row.metrics or {}), error=row.error,
                          cancel_requested=bool(row.cancel_requested), created_at=as_utc(row.created_at),
                          finished_at=as_utc(row.finished_at))


def _key(ref_id: int) -> str:
    return f"refine:{ref_id}"


def _worker(ctx):
    worker = getattr(ctx, "worker", None)
    if worker is None:
        raise UserError("this process has no worker; start the app (or use `app.py label RUN refine`)")
    return worker


def _device(config) -> str:
    """The device refinement jobs of this app run on (config.device, "auto" resolved)."""
    device = str(getattr(config, "device", "cpu") or "cpu")
    if device == "auto":
        from core.precision import resolve_device

        device = str(resolve_device("auto"))
    return device


def dense_by_default(config) -> bool:
    """Finer maps unless asked otherwise where they are cheap: on a GPU the four extra backbone passes
    per image take milliseconds; on a CPU they add about 2.2 s per image (2 cores, CamVid at 322),
    so they stay opt-in there. Chosen on CamVid train, confirmed on val (docs/evaluation.md)."""
    return _device(config).startswith("cuda")


def start_refinement(ctx, run_id: int, params: dict[str, Any] | None = None) -> RefinementInfo:
    """Queue a propagation job of a finished run with at least one named cluster (``params``: RefineConfig
    fields; ``dense`` left out = ``dense_by_default``)."""
    params = dict(params or {})
    params.setdefault("dense", dense_by_default(ctx.config))
    config = RefineConfig.from_dict(params)
    try:
        config.validate()
    except ValueError as exc:
        raise UserError(f"invalid refinement setting: {exc}") from None
    worker = _worker(ctx)
    clusters = mapping.list_clusters(ctx, run_id)
    if not any(c.label_name and not c.ignored for c in clusters):
        raise UserError("name at least one cluster before refining with names")
    with ctx.db.write() as s:
        run = lock_for_update(s, Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} does not exist")
        if run.status != RUN_DONE:
            raise UserError(f"run {run_id} is {run.status}; refine once it is done")
        busy = s.scalars(select(Refinement).where(Refinement.run_id == run_id,
                                                  Refinement.status.in_(RUN_ACTIVE))).first()
        if busy is not None:
            raise UserError(f"refinement {busy.id} of this run is {busy.status}; wait for it or cancel it")
        row = Refinement(run_id=run_id, status=RUN_QUEUED, mapping_version=run.mapping_version,
                         params=params, metrics={}, owner=worker.owner,
                         heartbeat_at=utcnow())
        s.add(row)
        s.flush()
        info = _info(row)
    worker.submit_job(_key(info.id), lambda cancel, stopping, rid=info.id: execute(ctx.db, ctx.config, rid,
                                                                                   cancel, stopping))
    log.info("refinement %s of run %s queued", info.id, run_id)
    return info


def get_refinement(ctx, ref_id: int) -> RefinementInfo:
    with ctx.db.read() as s:
        row = s.get(Refinement, ref_id)
        if row is None:
            raise NotFound(f"refinement {ref_id} does not exist")
        return _info(row)


def list_refinements(ctx, run_id: int) -> list[RefinementInfo]:
    """Refinements of a run, newest first."""
    with ctx.db.read() as s:
        rows = s.scalars(select(Refinement).where(Refinement.run_id == run_id).order_by(Refinement.id.desc()))
        return [_info(r) for r in rows]


def latest_refinement(ctx, run_id: int) -> RefinementInfo | None:
    with ctx.db.read() as s:
        row = s.scalars(select(Refinement).where(Refinement.run_id == run_id)
                        .order_by(Refinement.id.desc()).limit(1)).first()
        return None if row is None else _info(row)


def cancel_refinement(ctx, ref_id: int) -> RefinementInfo:
    with ctx.db.write() as s:
        row = lock_for_update(s, Refinement, ref_id)
        if row is None:
            raise NotFound(f"refinement {ref_id} does not exist")
        jobs.cancel(row, f"refinement {ref_id}", "ones")
        s.flush()
        info = _info(row)
    worker = getattr(ctx, "worker", None)
    if worker is not None:
        worker.request_cancel(_key(ref_id))
    return info


def resume_refinement(ctx, ref_id: int) -> RefinementInfo:
    """Queue a cancelled, failed or interrupted refinement again; its trained classifier and
    the maps already written are reused."""
    worker = _worker(ctx)
    with ctx.db.write() as s:
        row = lock_for_update(s, Refinement, ref_id)
        if row is None:
            raise NotFound(f"refinement {ref_id} does not exist")
        jobs.check_resumable(row, f"refinement {ref_id}", "ones")
        busy = s.scalars(select(Refinement).where(Refinement.run_id == row.run_id, Refinement.id != ref_id,
                                                  Refinement.status.in_(RUN_ACTIVE))).first()
        if busy is not None:
            raise UserError(f"refinement {busy.id} of this run is {busy.status}; wait for it or cancel it")
        jobs.requeue(row, worker.owner)
        s.flush()
        info = _info(row)
    worker.submit_job(_key(ref_id), lambda cancel, stopping: execute(ctx.db, ctx.config, ref_id, cancel, stopping))
    return info


def wait_for_refinement(ctx, ref_id: int, timeout: float | None = None, poll: float = 0.2) -> RefinementInfo:
    return jobs.wait(lambda: get_refinement(ctx, ref_id), timeout, poll)


def inputs_time(meta: dict | None) -> float | None:
    """When the job that made refined maps (``meta``, their meta.json) first read the naming and
    the corrections: a correction imported after it is not in them (None: no maps)."""
    if meta is None:
        return None
    return float(meta.get("inputs_read", meta.get("created", 0.0)))


def _maps_meta(ctx, run_id: int) -> tuple[dict | None, int]:
    """The refined maps' meta.json (None: no maps) and the run's mapping version now."""
    with ctx.db.read() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} does not exist")
        run_dir, version = Path(run.run_dir), run.mapping_version
    return segmaps.refined_meta(run_dir), version


def refined_state(ctx, run_id: int) -> RefinedState:
    meta, version = _maps_meta(ctx, run_id)
    with ctx.db.read() as s:
        pending = corrections.pending(s, run_id, inputs_time(meta))
    if meta is None:
        return RefinedState(False, None, None, version, None, corrections_pending=pending)
    return RefinedState(True, meta.get("refinement_id"), meta.get("mapping_version"), version, meta.get("n_classes"),
                        bool((meta.get("settings") or {}).get("dense", False)), pending,
                        meta.get("n_labels"), meta.get("n_unnamed"))


def image_corrections(ctx, run_id: int, image_id: int | None = None) -> list[corrections.ImageCorrections]:
    """The run's corrected images (or one), each saying whether the refined maps hold its corrections."""
    return corrections.list_corrections(ctx, run_id, inputs_time(_maps_meta(ctx, run_id)[0]), image_id)


def forget_corrections(ctx, run_id: int, image_id: int) -> str:
    """Delete one image's imported corrections (it stays checked); says what was forgotten."""
    before = image_corrections(ctx, run_id, image_id)
    corrections.remove_corrections(ctx, run_id, image_id)
    if not before:
        return "This image had no imported corrections."
    c = before[0]
    text = (f"Corrections forgotten ({', '.join(c.labels)}; from {c.source}); the image stays checked. "
            "Import the file again to bring them back.")
    if c.in_maps:
        text += " Refine with names again to take them out of the refined maps."
    return text


def poll_key(ctx, run_id: int) -> list | None:
    """A cheap fingerprint of what the refine status shows (one read and one small file), for a
    page polling it: it changes when the run's naming, its latest refinement's status or progress,
    the refined maps or the corrections that count change. None while the run is not done."""
    with ctx.db.read() as s:
        run = s.get(Run, run_id)
        if run is None or run.status != RUN_DONE:
            return None
        job = s.scalars(select(Refinement).where(Refinement.run_id == run_id)
                        .order_by(Refinement.id.desc()).limit(1)).first()
        job_key = [None, None, None] if job is None else [job.id, job.status, round(float(job.progress or 0.0), 2)]
        fixed = list(corrections.fingerprint(s, run_id))
        run_dir, version = Path(run.run_dir), run.mapping_version
    meta = segmaps.refined_meta(run_dir) or {}
    return [meta.get("refinement_id"), meta.get("mapping_version"), version, *job_key, *fixed]


def mark_interrupted(db, is_alive) -> list[int]:
    """Refinements queued/running under a worker that is gone become 'interrupted'."""
    return jobs.mark_interrupted(db, Refinement, is_alive,
                                 "the app stopped during this refinement; resume it to continue")


# ---------------------------------------------------------------- the job

def class_space(clusters: list[mapping.ClusterInfo]) -> ClassSpace:
    """Classes: each label (as its lowest cluster), each unnamed cluster, all ignored ones as one."""
    names = {c.label_id: c.label_name or f"label {c.label_id}" for c in clusters if c.label_id is not None}
    return ClassSpace.of_clusters([(c.index, c.label_id, c.ignored) for c in clusters], names.__getitem__)


class _Reporter:
    def __init__(self, db, ref_id: int):
        self.db, self.ref_id, self.last = db, ref_id, 0.0

    def __call__(self, stage: str, fraction: float, info: dict) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL and fraction < 1.0:
            return
        self.last = now
        try:
            with self.db.write() as s:
                s.execute(update(Refinement).where(Refinement.id == self.ref_id).values(
                    stage=stage, progress=float(fraction), heartbeat_at=utcnow()))
        except Exception:  # progress is best effort
            log.exception("could not record progress of refinement %s", self.ref_id)


def _inputs(db, config, ref_id: int):
    """Everything the job reads from the database, in one read."""
    with db.read() as s:
        row = s.get(Refinement, ref_id)
        run = s.get(Run, row.run_id)
        items = s.execute(select(RunImage.position, RunImage.confirmed, Image.path, Image.height, Image.width,
                                 Image.id)
                          .join(Image, RunImage.image_id == Image.id).where(RunImage.run_id == run.id)
                          .order_by(RunImage.position)).all()
        return (run.id, Path(run.run_dir), dict(row.params or {}),
                [(int(p), bool(c), Path(path), (int(h), int(w)), int(i)) for p, c, path, h, w, i in items])


def execute(db, config, ref_id: int, cancel_event: threading.Event, stopping: threading.Event) -> None:
    """Run one queued refinement (called by the worker thread); every outcome is recorded."""
    with db.write() as s:
        row = s.get(Refinement, ref_id)
        if row is None or row.status != RUN_QUEUED:
            return
        if row.cancel_requested:
            row.status, row.finished_at = RUN_CANCELLED, utcnow()
            return
        row.status, row.started_at, row.error = RUN_RUNNING, row.started_at or utcnow(), None
        run_id = row.run_id
    last_poll = [0.0]

    def cancelled() -> bool:
        if cancel_event.is_set():
            return True
        now = time.monotonic()
        if now - last_poll[0] >= CANCEL_POLL:
            last_poll[0] = now
            try:
                with db.read() as s2:
                    if s2.scalar(select(Refinement.cancel_requested).where(Refinement.id == ref_id)):
                        cancel_event.set()
            except Exception:
                log.warning("could not check refinement %s for cancellation", ref_id, exc_info=True)
        return cancel_event.is_set()

    try:
        metrics = _run_job(db, config, ref_id, _Reporter(db, ref_id), cancelled)
        with db.write() as s:
            s.execute(update(Refinement).where(Refinement.id == ref_id).values(
                status=RUN_DONE, progress=1.0, stage=None, metrics=json.loads(json.dumps(metrics, default=str)),
                finished_at=utcnow(), cancel_requested=False))
        log.info("refinement %s done", ref_id)
    except BaseException as exc:  # noqa: BLE001 - every outcome is recorded
        from core.errors import Cancelled

        if isinstance(exc, Cancelled):
            status = RUN_INTERRUPTED if stopping.is_set() else RUN_CANCELLED
            error = "the app stopped during this refinement; resume it to continue" if stopping.is_set() else None
        else:
            status, error = RUN_FAILED, jobs.failure_text(db, run_id, exc)
            log.error("refinement %s failed: %s", ref_id, error, exc_info=exc)
            jobs.mark_unreadable(db, run_id, exc)
        try:
            with db.write() as s:
                s.execute(update(Refinement).where(Refinement.id == ref_id).values(
                    status=status, error=error, finished_at=utcnow(), cancel_requested=False))
        except Exception:
            log.exception("could not record the end of refinement %s", ref_id)
        if not isinstance(exc, Exception):
            raise


def _run_job(db, config, ref_id: int, report, cancelled) -> dict:
    from core.metrics import downsample_labels
    from core.pipeline import StegoPipeline, item_codes
    from core.refinement import refine

    started = time.time()                  # before anything is read: what changes after this is not in the maps
    run_id, run_dir, params, items = _inputs(db, config, ref_id)
    shim = SimpleNamespace(db=db, config=config)
    with db.read() as s:
        version = s.get(Run, run_id).mapping_version
    clusters = mapping.list_clusters(shim, run_id)
    space = class_space(clusters)
    pipe = StegoPipeline.load(run_dir)
    rd = RunDir(run_dir)
    try:
        store = rd.infer_store()
    except FeaturesMissing as exc:
        raise UserError(f"run {run_id}: {exc}; resume the run first") from None
    settings = RefineConfig.from_dict({**params, "crf_resolution": pipe.config.crf_short_side,
                                       "n_jobs": max(1, int(getattr(config, "pipeline_jobs", 1) or 1)),
                                       "device": _device(config)})
    partial_root = rd.refined_partial_root
    for other in partial_root.glob("*") if partial_root.is_dir() else []:
        if other.name != str(ref_id):
            shutil.rmtree(other, ignore_errors=True)       # an older job's leftovers
    out_dir = rd.refined_partial(ref_id)
    saved_space = out_dir / SPACE
    if saved_space.is_file():        # resuming: keep the names this job started with
        space = ClassSpace.from_dict(json.loads(saved_space.read_text()))
        first = json.loads(rd.refined_job_json(ref_id).read_text())
        meta_version, started = first["mapping_version"], float(first.get("inputs_read", 0.0))
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(rd.refined_job_json(ref_id), {"mapping_version": version, "inputs_read": started})
        meta_version = version
    found = segmaps.found_clusters(run_dir)
    index = segmaps.correspondence_index(run_dir) if found else None
    found_sims = [(int(f["index"]), float(f["threshold"]), segmaps.found_similarities(run_dir, f))
                  for f in found] if index is not None else []

    def found_of(i: int):
        if not found_sims:
            return None
        out = np.full(store.grid(i)[0] * store.grid(i)[1], -1, dtype=np.int64)
        for idx, thr, sims in found_sims:
            out[np.asarray(index.item_map(sims, i)).ravel() >= thr] = idx
        return out

    seeds = {}
    n_total = len(space.cluster_to_class)
    kind = "crf" if segmaps.has_maps(run_dir, "crf") else "plain"
    label_cluster: dict[int, int] = {}
    for c in clusters:                               # a label's class is written as its lowest cluster
        if c.label_id is not None and not c.ignored:
            label_cluster[c.label_id] = min(c.index, label_cluster.get(c.label_id, c.index))
    with db.read() as s:
        corrected = corrections.correction_maps(s, run_id, label_cluster)
    overrides = {}
    for pos, confirmed, _, _, image_id in items:
        if image_id in corrected:                    # a person's corrected masks: the truth there
            overrides[pos] = corrected[image_id]
            seeds[pos] = correction_seeds(corrected[image_id], store.grid(pos), n_total)
        elif confirmed:
            seg = segmaps.read_map(run_dir, pos, kind)
            seeds[pos] = downsample_labels(seg, store.grid(pos), n_total).ravel()

    def codes_of(i: int) -> np.ndarray:
        codes = item_codes(pipe.head, store, i)
        return codes.reshape(-1, codes.shape[-1])

    metrics = refine(store, codes_of, pipe.centroids, space, [it[2] for it in items],
                     [it[3] for it in items], out_dir, settings, found_of=found_of, seeds=seeds, overrides=overrides,
                     progress=report, cancel=cancelled, backbone=pipe.backbone() if settings.dense else None)
    meta = {"refinement_id": ref_id, "mapping_version": meta_version, "n_classes": space.n_classes,
            "n_labels": space.n_labels, "n_unnamed": space.n_unnamed,
            "classes": [{"name": n, "cluster": c} for n, c in zip(space.names, space.class_to_cluster)],
            "seed_images": len(seeds), "corrected_images": len(overrides), "found_clusters": len(found_sims), "settings": settings.to_dict(),
            "created": time.time(), "inputs_read": started}
    atomic_write_json(out_dir / rd.refined_meta_json.name, meta)
    final = rd.segments_dir("refined")
    old = rd.refined_old(ref_id)
    if final.exists():
        final.rename(old)
    out_dir.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return {**metrics, "mapping_version": meta_version, "seed_images": len(seeds), "corrected_images": len(overrides)}
