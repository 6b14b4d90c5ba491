"""Storage basics: configuration, transactions, SQLite locking, projects, run recovery on start."""
from __future__ import annotations

import os
import socket
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from stego_app import config as config_mod
from stego_app import projects
from stego_app.config import AppConfig
from stego_app.context import create_context
from stego_app.errors import NotFound, UserError
from stego_app.models import Image, Project, Run, utcnow


def test_config_reads_env_then_flags(tmp_path):
    env = {"STEGO_DATA_DIR": str(tmp_path / "d"), "STEGO_PORT": "9000", "STEGO_AUTH": "ann:secret",
           "STEGO_ALLOWED_ROOTS": os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]),
           "STEGO_DEMO": "no", "STEGO_BACKBONE": "dino_vits16"}
    cfg = AppConfig.from_env(env, port=7000, backbone=None)
    assert cfg.port == 7000                       # flag wins
    assert cfg.backbone == "dino_vits16"          # None flag keeps the env value
    assert cfg.auth == ("ann", "secret") and cfg.demo is False
    assert cfg.allowed_roots == [tmp_path / "a", tmp_path / "b"]
    r = cfg.resolved()
    assert r.database_url == f"sqlite:///{tmp_path / 'd' / 'stego.db'}"
    assert r.cache_dir == tmp_path / "d" / "cache"
    with pytest.raises(UserError, match="user:password"):
        AppConfig.from_env({"STEGO_AUTH": "nocolon"})
    with pytest.raises(UserError, match="number"):
        AppConfig.from_env({"STEGO_PORT": "eighty"})
    assert AppConfig.from_env({"STEGO_PRECISION": "float32"}).precision == "float32"
    with pytest.raises(UserError, match="STEGO_PRECISION must be one of"):
        AppConfig.from_env({"STEGO_PRECISION": "half"})
    from core.precision import PRECISIONS   # the app's copy of the list stays in step with core

    assert config_mod.PRECISIONS == PRECISIONS


def test_create_context_makes_folders_and_database(app_config):
    ctx = create_context(app_config)
    try:
        cfg = ctx.config
        for d in (cfg.images_dir, cfg.runs_dir, cfg.exports_dir, cfg.feature_cache_dir):
            assert d.is_dir()
        assert (cfg.data_dir / "stego.db").is_file()
        with ctx.db.read() as s:
            assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert s.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        ctx.close()


def test_failed_write_transaction_changes_nothing(app_ctx):
    with pytest.raises(RuntimeError):
        with app_ctx.db.write() as s:
            s.add(Project(name="half-written"))
            s.flush()
            raise RuntimeError("crash in the middle of a request")
    assert projects.list_projects(app_ctx) == []


def test_foreign_keys_cascade(app_ctx):
    p = projects.create_project(app_ctx, "cascade")
    with app_ctx.db.write() as s:
        s.add(Image(project_id=p.id, name="a.png", sha256="0" * 64, path="/x/a.png", width=1, height=1,
                    mode="RGB", format="PNG", file_size=1))
    with app_ctx.db.write() as s:
        s.delete(s.get(Project, p.id))
    with app_ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Image)) == 0


def test_concurrent_read_modify_write_loses_nothing(app_ctx, tmp_path):
    """Two threads and a second engine increment one value through write transactions."""
    p = projects.create_project(app_ctx, "counter", description="0")
    other = create_context(AppConfig(data_dir=app_ctx.config.data_dir, worker=False))
    errors: list[BaseException] = []

    def bump(ctx, n):
        try:
            for _ in range(n):
                with ctx.db.write() as s:
                    row = s.get(Project, p.id)
                    value = int(row.description)
                    row.description = str(value + 1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=bump, args=(c, 25)) for c in (app_ctx, app_ctx, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    assert not errors
    assert projects.get_project(app_ctx, p.id).description == "75"


def test_projects_create_list_find(app_ctx):
    assert projects.list_projects(app_ctx) == [] and projects.recent_project(app_ctx) is None
    a = projects.create_project(app_ctx, "  Street   scenes ", "dashcam")
    assert a.name == "Street scenes" and a.n_images == 0 and a.n_runs == 0
    with pytest.raises(UserError, match="already exists"):
        projects.create_project(app_ctx, "street SCENES")
    with pytest.raises(UserError, match="empty"):
        projects.create_project(app_ctx, "   ")
    b = projects.create_project(app_ctx, "Fields")
    assert [p.name for p in projects.list_projects(app_ctx)] == ["Street scenes", "Fields"]
    assert projects.find_project(app_ctx, "fields").id == b.id
    assert projects.find_project(app_ctx, str(a.id)).id == a.id
    assert projects.get_project(app_ctx, b.id).description == ""
    with pytest.raises(NotFound):
        projects.get_project(app_ctx, 999)
    with pytest.raises(NotFound):
        projects.find_project(app_ctx, "nope")
    # a page opened without a project shows the one with the latest activity
    assert projects.recent_project(app_ctx) == b.id                      # the newest project
    with app_ctx.db.write() as s:
        s.add(Run(project_id=a.id, status="queued", params={}, created_at=utcnow() + timedelta(seconds=1)))
    assert projects.recent_project(app_ctx) == a.id                      # a run started in an older one


def _add_run(ctx, status, owner, heartbeat):
    p = projects.create_project(ctx, f"p{len(projects.list_projects(ctx))}")
    with ctx.db.write() as s:
        run = Run(project_id=p.id, status=status, owner=owner, heartbeat_at=heartbeat, params={})
        s.add(run)
        s.flush()
        return run.id


def test_runs_of_dead_processes_become_interrupted_on_start(app_config):
    ctx = create_context(app_config)
    host = socket.gethostname()
    now = utcnow()
    dead_local = _add_run(ctx, "running", f"{host}:999999999:abc", now)
    dead_remote = _add_run(ctx, "running", "elsewhere:12:abc", now - timedelta(hours=1))
    queued_dead = _add_run(ctx, "queued", f"{host}:{os.getpid()}:gone", None)   # earlier life of this pid
    live_remote = _add_run(ctx, "running", "elsewhere:12:abc", now)
    live_local = _add_run(ctx, "running", f"{host}:{os.getppid()}:abc", now)   # the parent process lives
    finished = _add_run(ctx, "done", None, None)
    ctx.close()
    ctx = create_context(app_config)
    try:
        with ctx.db.read() as s:
            status = {r.id: r.status for r in s.scalars(select(Run))}
        assert status[dead_local] == status[dead_remote] == status[queued_dead] == "interrupted"
        assert status[live_remote] == status[live_local] == "running"
        assert status[finished] == "done"
    finally:
        ctx.close()


def test_database_url_can_point_elsewhere(tmp_path):
    url = f"sqlite:///{tmp_path / 'elsewhere' / 'custom.db'}"
    ctx = create_context(AppConfig(data_dir=tmp_path / "data", database_url=url, worker=False))
    try:
        projects.create_project(ctx, "x")
    finally:
        ctx.close()
    assert Path(tmp_path / "elsewhere" / "custom.db").is_file()
    assert not (tmp_path / "data" / "stego.db").exists()
