"""Alembic environment: the URL comes from the app, never from alembic.ini.

Order: a connection handed in by stego_app.db (config.attributes["connection"]),
else the sqlalchemy.url main option set by stego_app.db.alembic_config(), else
AppConfig.from_env() (STEGO_DATABASE_URL / STEGO_DATA_DIR) for command-line use.
"""
from __future__ import annotations

import logging.config

from alembic import context

from stego_app.models import Base

config = context.config
target_metadata = Base.metadata

# Only configure logging when run from the alembic command line, not inside the app.
if config.config_file_name is not None and config.attributes.get("connection") is None \
        and not config.get_main_option("sqlalchemy.url"):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from stego_app.config import AppConfig

    return AppConfig.from_env().resolved().database_url  # type: ignore[return-value]


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite",
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from stego_app.db import make_engine

    engine = make_engine(_url())
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
