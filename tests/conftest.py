"""Shared fixtures: an API on a real SQLite file or a real PostgreSQL database, users, runners."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from helix_api.accounts.auth import create_runner_token, create_user
from helix_api.app import create_app
from helix_api.db import Database
from helix_api.models import Base
from helix_api.ops.schema_version import upgrade
from helix_api.services import services

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TEXT_MODEL = "mistralai/Mistral-7B-Instruct-v0.1"
IMAGE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
# What users see of the two: their aliases (helix_api/catalog.py).
TEXT_ALIAS = "mistral-7b-instruct"
IMAGE_ALIAS = "sdxl-base"
SEED_CLAIM_URL = f"/api/v1/worker/task?mode=Create&type=Text&model_name={TEXT_MODEL}"


def _postgres_problem(url: str) -> str | None:
    try:
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # any failure to connect means: no server for us
        return str(exc).strip().splitlines()[0]


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The admin URL of a reachable PostgreSQL; skipped loudly without one, a failure under CI."""
    url = os.environ.get("HELIX_TEST_POSTGRES_URL", DEFAULT_POSTGRES)
    problem = _postgres_problem(url)
    if problem:
        message = f"PostgreSQL at {make_url(url).render_as_string()} is unreachable: {problem}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (under CI=true an unreachable PostgreSQL is a failure, not a skip)")
        pytest.skip(f"POSTGRESQL TESTS SKIPPED: {message}")
    return url


@pytest.fixture(scope="session")
def postgres_database(postgres_server: str) -> Callable[[], str]:
    """A factory of fresh, empty PostgreSQL databases, all dropped when the run ends."""
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make() -> str:
        name = f"helix_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return make_url(postgres_server).set(database=name).render_as_string(hide_password=False)

    yield make
    with admin.connect() as conn:
        for name in made:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once through Alembic; each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "helix.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_migrated(postgres_database: Callable[[], str]) -> str:
    """A PostgreSQL database migrated once through Alembic; emptied between tests."""
    url = postgres_database()
    upgrade(url)
    return url


def _empty_postgres(url: str) -> None:
    engine = create_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> str:
    """A migrated, empty database: a SQLite file, or the PostgreSQL test database."""
    if request.param == "sqlite":
        path = tmp_path / "helix.db"
        shutil.copy(sqlite_template, path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("postgres_migrated")
    _empty_postgres(url)
    return url


def database_of(app: Flask) -> Database:
    """The database an app runs on, from its services as its views reach them."""
    with app.app_context():
        return services().database


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> dict[str, Any]:
    """Overrides for create_app; tests change them before asking for `app`."""
    return {"DATABASE_URL": database_url, "DATA_DIR": str(tmp_path), "AUTO_UPGRADE": False,
            "RECHECK_SECONDS": 0.2, "REAP_SECONDS": 0.0}


@pytest.fixture
def app(settings: dict[str, Any]) -> Iterator:
    """The API on the test database."""
    application = create_app(settings)
    yield application
    database_of(application).dispose()


@pytest.fixture
def make_client(settings: dict[str, Any]) -> Iterator[Callable[..., Any]]:
    """`make_client(MAX_IMAGES=1)`: a test client of another app on the same database, other settings."""
    apps = []

    def make(**changes: Any):
        application = create_app({**settings, **changes})
        apps.append(application)
        return application.test_client()

    yield make
    for application in apps:
        database_of(application).dispose()


@pytest.fixture
def db(app) -> Database:
    """The app's database."""
    return database_of(app)


@pytest.fixture
def client(app):
    """A Flask test client."""
    return app.test_client()


def bearer(secret: str) -> dict[str, str]:
    """Authorization headers for an API key or runner token."""
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def make_user(db: Database) -> Callable[[str], dict[str, str]]:
    """Create a user; returns the headers that authenticate as them."""
    def make(name: str | None = None) -> dict[str, str]:
        with db.orm_write() as session:
            _, key = create_user(session, name or f"user-{uuid.uuid4().hex[:8]}")
        return bearer(key)
    return make


@pytest.fixture
def user(make_user) -> dict[str, str]:
    """Headers of a user."""
    return make_user("alice")


@pytest.fixture
def runner(db: Database) -> dict[str, str]:
    """Headers of a runner."""
    with db.orm_write() as session:
        token = create_runner_token(session, "test-runner")
    return bearer(token)


@pytest.fixture
def task_factory(client, user) -> Callable[..., dict[str, Any]]:
    """Create a session (and so its task) through the API; returns the session JSON."""
    def make(headers: dict[str, str] | None = None, **overrides: Any) -> dict[str, Any]:
        body = {"mode": "create", "type": "text", "model_name": TEXT_MODEL, "message": "hello"}
        body.update(overrides)
        response = client.post("/api/v1/sessions", json=body, headers=headers or user)
        assert response.status_code == 201, response.json
        return response.json
    return make


def claim(client, runner_headers: dict[str, str], model: str = TEXT_MODEL, **query: Any):
    """GET the worker claim endpoint; returns the response."""
    params = {"mode": "create", "type": "text", "model_name": model, **query}
    return client.get("/api/v1/worker/task", query_string=params, headers=runner_headers)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Mistral with random weights and a locally trained tokenizer, built once per test run."""
    from runner.tiny.mistral import build_tiny_mistral

    return build_tiny_mistral(tmp_path_factory.mktemp("models") / "tiny-mistral")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL pipeline (random weights, about 11 MB) built from configs once per test run."""
    from runner.tiny.sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "pipeline")
