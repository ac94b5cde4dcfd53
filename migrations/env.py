"""Alembic environment: runs revisions against the URL `helix db upgrade` passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

from helix_api.db import make_engine
from helix_api.models import Base
from helix_api.ops.schema_version import include_name

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    """Print SQL instead of running it (`alembic upgrade --sql`)."""
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run revisions on a live connection."""
    engine = make_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.connect() as connection:
        # Batch mode lets later revisions alter columns on SQLite (it recreates the table).
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                          include_name=include_name)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
