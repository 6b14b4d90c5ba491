"""Alembic: upgrade from an empty database, downgrade to nothing, models match the revisions."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from stego_app import projects
from stego_app.context import create_context
from stego_app.db import current_revision, downgrade, head_revision, make_engine, upgrade
from stego_app.models import Base

ROOT = Path(__file__).resolve().parent.parent
TABLES = {"projects", "images", "runs", "run_images", "clusters", "labels", "seed_annotations", "exports",
          "refinements"}


def test_upgrade_from_empty_matches_the_models(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    assert current_revision(engine) is None
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    assert TABLES <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                Base.metadata)
    assert diff == [], f"models.py and migrations/ disagree: {diff}"
    engine.dispose()


def test_downgrade_to_base_and_upgrade_again(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    upgrade(engine)
    downgrade(engine, "base")
    assert current_revision(engine) is None
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(engine)
    assert TABLES <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_restart_keeps_data_and_does_not_remigrate(app_config):
    ctx = create_context(app_config)
    projects.create_project(ctx, "kept")
    ctx.close()
    ctx = create_context(app_config)
    try:
        assert [p.name for p in projects.list_projects(ctx)] == ["kept"]
        assert current_revision(ctx.engine) == head_revision()
    finally:
        ctx.close()


def test_alembic_command_line_takes_the_url_from_the_app(tmp_path):
    env = dict(os.environ, STEGO_DATA_DIR=str(tmp_path / "cli-data"))
    env.pop("STEGO_DATABASE_URL", None)
    proc = subprocess.run([sys.executable, "-m", "alembic", "-c", str(ROOT / "migrations" / "alembic.ini"),
                           "upgrade", "head"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    db = tmp_path / "cli-data" / "stego.db"
    assert db.is_file()
    engine = make_engine(f"sqlite:///{db}")
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_postgresql_upgrade_downgrade(postgres_url):
    """The same revisions on PostgreSQL (skipped where PostgreSQL is not installed)."""
    engine = make_engine(postgres_url)
    upgrade(engine)
    assert TABLES <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                Base.metadata)
    assert diff == [], f"models.py and migrations/ disagree on PostgreSQL: {diff}"
    downgrade(engine, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    engine.dispose()
