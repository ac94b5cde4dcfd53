"""Schema versions: Alembic revisions in the `helix_api.migrations` package, applied by `helix db upgrade`.

The package is the top-level migrations/ of the source tree, mapped into the wheel by pyproject.toml, so an
installed Helix and `alembic` run by hand in a checkout read the same revisions.
"""

from __future__ import annotations

from importlib.resources import files

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from helix_api.db import normalize_url
from helix_api.errors import SchemaOutOfDate

# What the database's own full-text search keeps (SQLite's FTS5 table and its shadow tables, PostgreSQL's
# stored tsvector column and its GIN index; made by revision 0006): not in the models, so autogenerate
# leaves them alone.
SEARCH_TABLE = "knowledge_fts"
SEARCH_INDEX = "ix_knowledge_chunks_search"
SEARCH_COLUMN = ("knowledge_chunks", "search")


def include_name(name: str | None, type_: str, parent_names: dict[str, str | None]) -> bool:
    """Whether autogenerate compares a reflected object: everything but the full-text search's own."""
    if type_ == "table" and name is not None and name.startswith(SEARCH_TABLE):
        return False
    if type_ == "column" and (parent_names.get("table_name"), name) == SEARCH_COLUMN:
        return False
    return not (type_ == "index" and name == SEARCH_INDEX)


def migrations_dir() -> str:
    """The folder of env.py and versions/, wherever Helix is installed (a wheel or an editable checkout)."""
    return str(files("helix_api.migrations"))


def alembic_config(url: str) -> AlembicConfig:
    """An Alembic config for `url`, without needing an alembic.ini in the working directory."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", migrations_dir().replace("%", "%%"))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    """The newest revision this Helix carries."""
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
