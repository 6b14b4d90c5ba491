"""AppContext: configuration, database and run worker, built once per process."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from stego_app.config import AppConfig
from stego_app.db import Database, upgrade
from stego_app.export import mark_abandoned_exports
from stego_app.relocation import relocate
from stego_app.runs import mark_interrupted
from stego_app.worker import PipelineFactory, RunWorker, WorkerSettings, owner_alive

log = logging.getLogger(__name__)


@dataclass
class AppContext:
    """What every service receives first."""

    config: AppConfig          # resolved (absolute paths, defaults filled in)
    db: Database
    worker: RunWorker | None

    @property
    def engine(self) -> Engine:
        return self.db.engine

    @property
    def session_factory(self) -> sessionmaker:
        return self.db.session_factory

    def close(self) -> None:
        """Stop the worker (a running job is left 'interrupted') and release the database."""
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        self.db.dispose()

    def __enter__(self) -> "AppContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def create_context(config: AppConfig, pipeline_factory: PipelineFactory | None = None,
                   worker_settings: WorkerSettings | None = None) -> AppContext:
    """Create folders, migrate the database to head, recover unfinished runs (interrupted) and
    exports (failed), start the worker."""
    cfg = config.resolved()
    for folder in (cfg.data_dir, cfg.images_dir, cfg.runs_dir, cfg.exports_dir, cfg.thumbs_dir, cfg.tmp_dir,
                   cfg.feature_cache_dir):
        folder.mkdir(parents=True, exist_ok=True)
    db = Database(cfg.database_url)  # type: ignore[arg-type]
    try:
        upgrade(db.engine)
        relocate(db, cfg)                  # a moved or copied data folder: its stored paths follow it
        interrupted = mark_interrupted(db, owner_alive)
        if interrupted:
            log.warning("runs %s were interrupted and can be resumed", interrupted)
        mark_abandoned_exports(db, cfg.exports_dir)
        from stego_app.refinement import mark_interrupted as mark_refinements_interrupted

        mark_refinements_interrupted(db, owner_alive)
        worker = None
        if cfg.worker:
            worker = RunWorker(db, cfg, pipeline_factory, worker_settings)
            worker.start()
    except Exception:
        db.dispose()
        raise
    log.info("data in %s, database %s", cfg.data_dir,
             db.engine.url.render_as_string(hide_password=True))
    return AppContext(config=cfg, db=db, worker=worker)
