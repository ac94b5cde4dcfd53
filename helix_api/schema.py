"""Schema versions: Alembic revisions in migrations/, applied by `helix db upgrade`."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from .db import normalize_url
from .errors import SchemaOutOfDate

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str) -> AlembicConfig:
    """An Alembic config for `url`, without needing an alembic.ini in the working directory."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    """The newest revision in migrations/."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str, revision: str = "head") -> None:
    """Apply revisions up to `revision`."""
    command.upgrade(alembic_config(url), revision)


def ensure_current(engine: Engine, url: str, auto_upgrade: bool) -> None:
    """Refuse to serve a schema behind head, unless this is the self-upgrading embedded default."""
    head, current = head_revision(), current_revision(engine)
    if current == head:
        return
    if auto_upgrade:
        upgrade(url)
        return
    raise SchemaOutOfDate(
        f"The database schema is at revision {current or 'none'} but this Helix needs {head}: "
        f"run `helix db upgrade` (with the same HELIX_DATABASE_URL) and start again.")
