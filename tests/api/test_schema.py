"""Migrations: the schema comes from Alembic, and an old schema stops the server with advice."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from helix_api.app import create_app
from helix_api.db import make_engine
from helix_api.errors import SchemaOutOfDate
from helix_api.models import Base
from helix_api.ops import schema_version as schema
from tests.conftest import database_of

REPO = Path(__file__).resolve().parents[2]


def test_migrations_match_the_models(database_url):
    engine = make_engine(database_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_name": schema.include_name})
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert diff == []


def test_alembic_by_hand_and_helix_read_the_same_revisions(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # alembic.ini names its folder relative to itself, not to the working directory
    by_hand = ScriptDirectory.from_config(AlembicConfig(str(REPO / "alembic.ini")))
    assert Path(by_hand.dir).resolve() == Path(schema.migrations_dir()).resolve() == REPO / "migrations"
    assert by_hand.get_current_head() == schema.head_revision()


def test_server_refuses_a_schema_behind_head(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    with pytest.raises(SchemaOutOfDate, match="helix db upgrade"):
        create_app({"DATABASE_URL": url, "AUTO_UPGRADE": False})


def test_server_refuses_unmigrated_postgres(postgres_database):
    with pytest.raises(SchemaOutOfDate, match="revision none"):
        create_app({"DATABASE_URL": postgres_database(), "AUTO_UPGRADE": False})


def test_embedded_default_upgrades_itself(tmp_path, monkeypatch):
    monkeypatch.delenv("HELIX_DATABASE_URL", raising=False)
    app = create_app({"DATA_DIR": str(tmp_path)})
    engine = database_of(app).engine
    assert schema.current_revision(engine) == schema.head_revision()
    assert (tmp_path / "helix.db").exists()
    database_of(app).dispose()


def test_sqlite_runs_in_wal_mode(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'wal.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    engine.dispose()


def test_revision_0006_allows_the_score_mode_and_no_other(database_url):
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    engine = make_engine(database_url)
    insert = ("INSERT INTO runners (name, mode, type, model_name, first_seen_at, last_seen_at) "
              "VALUES (:name, :mode, 'text', 'm', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)")
    with engine.begin() as conn:
        conn.execute(text(insert), {"name": "scorer", "mode": "score"})
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(text(insert), {"name": "bad", "mode": "bogus"})
    engine.dispose()
