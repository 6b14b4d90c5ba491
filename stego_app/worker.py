"""The background run worker: one job at a time from a queue, progress into the DB.

The worker thread calls core.pipeline.StegoPipeline.fit with a progress callback
(throttled DB writes, at most every `progress_interval` seconds) and a cancel callback
(an in-process event, or the Run.cancel_requested flag polled from the DB, so a cancel
from another process works too). On success the clusters are stored and the run
becomes 'done' in one transaction; an exception marks it 'failed' with the message,
`Cancelled` marks it 'cancelled' ('interrupted' when the app is shutting down).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

from sqlalchemy import delete, select, update

from core.errors import Cancelled
from core.rundir import RunDir
from core.settings import RunSettings
from stego_app import jobs
from stego_app.config import AppConfig
from stego_app.db import Database
from stego_app.eta import LIVE_KEY, live_clock
from stego_app.models import (RUN_ACTIVE, RUN_CANCELLED, RUN_DONE, RUN_FAILED, RUN_INTERRUPTED, RUN_QUEUED,
                              RUN_RUNNING, Cluster, Label, Run, utcnow)
from stego_app.processes import hostname, owner_tag, pid_alive, split_owner
from stego_app.render import palette_colour

log = logging.getLogger(__name__)

STAGE_WEIGHTS = {"features": 0.35, "knn": 0.03, "training": 0.42, "clustering": 0.05,
                 "segments": 0.10, "crf": 0.05}
MAX_HISTORY = 500
HEARTBEAT_S = 20.0
STALE_AFTER = timedelta(minutes=10)   # a heartbeat older than this means the worker is gone

PipelineFactory = Callable[[Any, Path, Path], Any]


@dataclass
class WorkerSettings:
    progress_interval: float = 0.5    # seconds between progress writes
    cancel_poll: float = 1.0          # seconds between DB reads of cancel_requested


_LIVE_OWNERS: set[str] = set()   # workers alive in this process


def owner_alive(owner: str | None, heartbeat: datetime | None) -> bool:
    """Whether the worker named `owner` ("host:pid:token") may still be working."""
    if not owner:
        return False
    host, pid, _token = split_owner(owner)
    recent = heartbeat is not None and utcnow() - heartbeat < STALE_AFTER
    if host != hostname():
        return recent
    if pid is None:
        return False
    if pid == os.getpid():          # this process: alive only if that worker still runs here
        return owner in _LIVE_OWNERS
    return pid_alive(pid) and (recent or heartbeat is None)


def build_pipeline_config(params: RunSettings, backbone: str, config: AppConfig, n_train_items: int | None = None):
    """core.pipeline.PipelineConfig for a run: its settings plus the server's device, precision, weights."""
    from core.pipeline import PipelineConfig

    return PipelineConfig.from_settings(params, backbone=backbone, n_train_items=n_train_items,
                                        device=config.device, precision=config.precision,
                                        checkpoint=config.weights, n_jobs=config.pipeline_jobs)


def default_pipeline_factory(pipeline_config, run_dir: Path, cache_root: Path, engine=None):
    from core.pipeline import StegoPipeline

    return StegoPipeline(pipeline_config, run_dir, cache_root, engine=engine)


def _ray_engine(address: str, staging: str | None = None):
    """The process's Ray engine for ``address`` and shard ``staging`` (core.distributed; connected once)."""
    from core.distributed import engine_for

    return engine_for(address, staging=staging)


def resolve_backbone(params: RunSettings, config: AppConfig) -> str:
    if params.backbone:
        return params.backbone
    if config.backbone:
        return config.backbone
    from core.backbones import default_backbone_name

    return default_backbone_name(config.cache_dir, checkpoint=config.weights)


class _Progress:
    """The pipeline's progress callback: keeps stage timings/history, writes throttled."""

    def __init__(self, db: Database, run_id: int, crf: bool, interval: float, floor: float = 0.0,
                 timings: dict[str, float] | None = None):
        self.db, self.run_id, self.interval = db, run_id, interval
        self.floor = float(floor)   # a resumed run's bar never goes back below where it stopped
        self.base = {k: float(v) for k, v in (timings or {}).items() if isinstance(v, (int, float))}
        stages = [s for s in STAGE_WEIGHTS if crf or s != "crf"]
        total = sum(STAGE_WEIGHTS[s] for s in stages)
        self.weights = {s: STAGE_WEIGHTS[s] / total for s in stages}
        self.order = stages
        self.stage: str | None = None
        self.fraction = 0.0
        self.stage_started = time.monotonic()
        self.first: tuple[float, float] | None = None   # (fraction, stage seconds) of the stage's first progress
        self.timings: dict[str, float] = {}
        self.history: list[dict] = []
        self.last_write = 0.0
        self.lock = threading.Lock()

    def overall(self) -> float:
        if self.stage is None or self.stage not in self.weights:
            return self.floor
        i = self.order.index(self.stage)
        done = sum(self.weights[s] for s in self.order[:i])
        return max(self.floor, min(1.0, done + self.weights[self.stage] * self.fraction))

    def __call__(self, stage: str, fraction: float, info: dict | None = None) -> None:
        now = time.monotonic()
        with self.lock:
            force = stage != self.stage
            if force:
                if self.stage is not None:
                    self.timings[self.stage] = self.timings.get(self.stage, 0.0) + now - self.stage_started
                self.stage, self.stage_started, self.first = stage, now, None
            self.fraction = float(min(1.0, max(0.0, fraction)))
            if self.first is None and 0.0 < self.fraction < 1.0:
                self.first = (self.fraction, self._stage_elapsed(now))
            if stage == "training" and info and "step" in info:
                point = {k: float(v) for k, v in info.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)}
                if point:
                    self.history.append(point)
                    if len(self.history) > MAX_HISTORY:   # keep the whole span, half the density
                        self.history = self.history[::2]
            if force or self.fraction >= 1.0 or now - self.last_write >= self.interval:
                self.last_write = now
                self._write()

    def _stage_elapsed(self, now: float) -> float:
        """Seconds in the current stage, earlier attempts of a resumed run included."""
        return now - self.stage_started + self.base.get(self.stage or '', 0.0)

    def _write(self) -> None:
        now = time.monotonic()
        values = dict(stage=self.stage, stage_progress=self.fraction, progress=self.overall(),
                      history=list(self.history), heartbeat_at=utcnow(), timings=self.all_timings(),
                      metrics={LIVE_KEY: live_clock(self.stage, self._stage_elapsed(now), first=self.first)})
        try:
            with self.db.write() as s:
                s.execute(update(Run).where(Run.id == self.run_id).values(**values))
        except Exception:  # progress is best effort; the run itself goes on
            log.exception("could not record progress of run %s", self.run_id)

    def all_timings(self) -> dict[str, float]:
        """Seconds of the finished stages, earlier attempts of a resumed run included."""
        out = dict(self.base)
        for k, v in self.timings.items():
            out[k] = out.get(k, 0.0) + v
        return out

    def close(self) -> dict[str, float]:
        with self.lock:
            if self.stage is not None:
                self.timings[self.stage] = self.timings.get(self.stage, 0.0) + \
                    time.monotonic() - self.stage_started
                self.stage = None
            return self.all_timings()


class RunWorker:
    """A daemon thread that executes queued runs one at a time."""

    def __init__(self, db: Database, config: AppConfig, pipeline_factory: PipelineFactory | None = None,
                 settings: WorkerSettings | None = None):
        self.db = db
        self.config = config
        self.pipeline_factory = pipeline_factory or default_pipeline_factory
        self.settings = settings or WorkerSettings()
        self.owner = f"{owner_tag()}:{uuid.uuid4().hex[:8]}"
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._cancel: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._current: int | None = None
        self._thread: threading.Thread | None = None
        self._heartbeat: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        _LIVE_OWNERS.add(self.owner)
        self._thread = threading.Thread(target=self._loop, name="stego-run-worker", daemon=True)
        self._thread.start()
        self._heartbeat = threading.Thread(target=self._beat, name="stego-run-heartbeat", daemon=True)
        self._heartbeat.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current job; a running job is cancelled and left 'interrupted'."""
        self._stopping.set()
        with self._lock:
            for ev in self._cancel.values():
                ev.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("run worker did not stop within %.0f s", timeout)
        self._thread = None
        _LIVE_OWNERS.discard(self.owner)

    @property
    def busy(self) -> bool:
        return self._current is not None or not self._queue.empty()

    def submit(self, run_id: int) -> None:
        with self._lock:
            self._cancel[run_id] = threading.Event()
        self._queue.put(run_id)

    def submit_job(self, key: str, fn: Callable[[threading.Event, threading.Event], None]) -> None:
        """Queue another kind of job (e.g. a refinement): ``fn(cancel_event, stopping_event)``
        runs on the worker thread in turn with the runs; ``request_cancel(key)`` sets its event."""
        with self._lock:
            self._cancel[key] = threading.Event()
        self._queue.put((key, fn))

    def request_cancel(self, run_id: int | str) -> None:
        with self._lock:
            ev = self._cancel.get(run_id)
        if ev is not None:
            ev.set()

    def run_now(self, run_id: int) -> None:
        """Execute one queued run in the calling thread (CLI, tests)."""
        with self._lock:
            self._cancel.setdefault(run_id, threading.Event())
        self._execute(run_id)

    # -- threads
    def _loop(self) -> None:
        while not self._stopping.is_set():
            run_id = self._queue.get()
            if run_id is None:
                break
            try:
                if isinstance(run_id, tuple):
                    self._execute_job(*run_id)
                else:
                    self._execute(run_id)
            except Exception:  # never let the thread die
                log.exception("run worker: unexpected error with run %s", run_id)

    def _beat(self) -> None:
        """Tell other processes that this worker's queued and running runs are alive."""
        while not self._stopping.wait(HEARTBEAT_S):
            try:
                with self.db.write() as s:
                    s.execute(update(Run).where(Run.owner == self.owner, Run.status.in_(RUN_ACTIVE))
                              .values(heartbeat_at=utcnow()))
            except Exception:
                log.exception("run worker heartbeat failed")

    def _execute_job(self, key: str, fn: Callable[[threading.Event, threading.Event], None]) -> None:
        with self._lock:
            event = self._cancel.setdefault(key, threading.Event())
        self._current = key  # type: ignore[assignment]
        try:
            fn(event, self._stopping)
        finally:
            self._current = None
            with self._lock:
                self._cancel.pop(key, None)

    # -- one job
    def _execute(self, run_id: int) -> None:
        with self.db.write() as s:
            run = s.get(Run, run_id)
            if run is None or run.status != RUN_QUEUED:
                log.info("run %s is no longer queued (%s); skipped", run_id, run and run.status)
                return
            if run.cancel_requested:
                run.status, run.finished_at = RUN_CANCELLED, utcnow()
                return
            params = RunSettings.from_dict(run.params or {})
            run_dir = Path(run.run_dir)
            paths = [Path(ri.image.path) for ri in run.images]
            floor, earlier = float(run.progress or 0.0), dict(run.timings or {})
            run.status, run.owner, run.heartbeat_at = RUN_RUNNING, self.owner, utcnow()
            run.started_at = run.started_at or utcnow()
            run.error, run.stage, run.stage_progress = None, None, 0.0
        self._current = run_id
        event = self._cancel.setdefault(run_id, threading.Event())
        progress = _Progress(self.db, run_id, params.crf, self.settings.progress_interval, floor, earlier)
        last_poll = [0.0]

        def cancelled() -> bool:
            if event.is_set():
                return True
            now = time.monotonic()
            if now - last_poll[0] >= self.settings.cancel_poll:
                last_poll[0] = now
                try:
                    with self.db.read() as s2:
                        if s2.scalar(select(Run.cancel_requested).where(Run.id == run_id)):
                            event.set()
                except Exception:  # a busy or briefly unreachable database must not kill the run
                    log.warning("could not check run %s for cancellation", run_id, exc_info=True)
            return event.is_set()

        log.info("run %s started: %d images -> %s", run_id, len(paths), run_dir)
        try:
            pipeline_config = self._pipeline_config(params, run_dir)
            with self.db.write() as s:
                s.execute(update(Run).where(Run.id == run_id).values(
                    backbone=pipeline_config.features.backbone))
            run_dir.mkdir(parents=True, exist_ok=True)
            engine = ({"engine": _ray_engine(self.config.ray_address, self.config.ray_staging)}
                      if self.config.ray_address else {})
            pipeline = self.pipeline_factory(pipeline_config, run_dir, self.config.cache_dir, **engine)
            result = pipeline.fit(paths, progress=progress, cancel=cancelled)
            self._finish(run_id, run_dir, result, progress.close())
            log.info("run %s done", run_id)
        except BaseException as exc:  # noqa: BLE001 - every outcome must be recorded
            timings = progress.close()
            if isinstance(exc, KeyboardInterrupt):
                status, error = RUN_INTERRUPTED, "stopped by the user (Ctrl-C); resume it to continue"
            elif isinstance(exc, Cancelled):
                status = RUN_INTERRUPTED if self._stopping.is_set() else RUN_CANCELLED
                error = ("the app stopped during this run; resume it to continue"
                         if status == RUN_INTERRUPTED else None)
                log.info("run %s %s", run_id, status)
            else:
                status, error = RUN_FAILED, jobs.failure_text(self.db, run_id, exc)
                log.error("run %s failed: %s", run_id, error, exc_info=exc)
                jobs.mark_unreadable(self.db, run_id, exc)
            try:
                with self.db.write() as s:
                    s.execute(update(Run).where(Run.id == run_id).values(
                        status=status, error=error, finished_at=utcnow(), cancel_requested=False,
                        timings=timings, heartbeat_at=utcnow()))
            except Exception:
                log.exception("could not record the end of run %s", run_id)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._current = None
            with self._lock:
                self._cancel.pop(run_id, None)

    def _pipeline_config(self, params: RunSettings, run_dir: Path):
        """A resumed run keeps the exact configuration it started with (run_dir/config.json)."""
        saved = RunDir(run_dir).config_json
        if saved.is_file():
            from core.pipeline import PipelineConfig

            return PipelineConfig.from_dict(json.loads(saved.read_text()))
        return build_pipeline_config(params, resolve_backbone(params, self.config), self.config)

    def _finish(self, run_id: int, run_dir: Path, result: Any, timings: dict[str, float]) -> None:
        """Store clusters and results; the run becomes 'done' in the same transaction."""
        rd = RunDir(run_dir)
        clusters = rd.read_json(rd.clusters_json)
        result_path = rd.result_json
        metrics: dict[str, Any] = json.loads(result_path.read_text()) if result_path.is_file() else {}
        if not metrics and result is not None:
            metrics = _as_dict(result)
        weights_source = metrics.get("weights_source")
        stage_timings = metrics.get("timings")
        if isinstance(stage_timings, dict) and stage_timings:
            timings = {k: float(v) for k, v in stage_timings.items() if isinstance(v, (int, float))}
        with self.db.write() as s:
            run = s.get(Run, run_id)
            assert run is not None
            positions = {ri.position: ri.image_id for ri in run.images}
            s.execute(delete(Cluster).where(Cluster.run_id == run_id))
            s.execute(delete(Label).where(Label.run_id == run_id))
            for c in sorted(clusters, key=lambda c: int(c["id"])):
                idx = int(c["id"])
                examples = [positions[int(p)] for p in c.get("examples", []) if int(p) in positions]
                s.add(Cluster(run_id=run_id, index=idx, pixels=int(c.get("pixels", 0)),
                              share=float(c.get("share", 0.0)), centroid_ref=f"centroids.npy#{idx}",
                              examples=examples, colour=palette_colour(idx), ignored=False))
            run.status, run.progress, run.stage_progress = RUN_DONE, 1.0, 1.0
            run.stage, run.finished_at, run.error = None, utcnow(), None
            run.metrics = _jsonable(metrics)
            run.timings = timings
            history = _read_history(rd.train_history_json)
            if history:
                run.history = history
            if weights_source:
                run.weights_source = str(weights_source)
            run.cancel_requested = False


def _read_history(path: Path) -> list[dict]:
    """The trainer's full loss history, thinned to at most MAX_HISTORY points (last one kept)."""
    try:
        history = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(history, list):
        return []
    points = [{k: float(v) for k, v in h.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
              for h in history if isinstance(h, dict)]
    if len(points) > MAX_HISTORY:
        stride = -(-len(points) // MAX_HISTORY)
        points = points[::stride][: MAX_HISTORY - 1] + [points[-1]]
    return points


def _as_dict(result: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    if is_dataclass(result) and not isinstance(result, type):
        return asdict(result)
    if isinstance(result, dict):
        return dict(result)
    return {}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def start_worker(db: Database, config: AppConfig, pipeline_factory: PipelineFactory | None = None,
                 settings: WorkerSettings | None = None) -> RunWorker:
    worker = RunWorker(db, config, pipeline_factory, settings)
    worker.start()
    return worker


__all__: Sequence[str] = ("RunWorker", "WorkerSettings", "owner_alive", "start_worker")
