"""The wheel alone runs the API: built from the source, installed away from it, migrated and served.

The wheel goes into a fresh virtualenv of its own; the API's dependencies come from the project's
virtualenv through a .pth line that sorts after the new site-packages, so the installed (non-editable)
helix_api is the one imported. Every command runs in a temporary folder, never in the checkout.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import requests

from helix_api.ops.schema_version import head_revision
from tests.e2e.processes import free_port, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# What a build reads: the project file, the README it names, and the packages' folders.
SOURCES = ("pyproject.toml", "README.md", "helix_api", "runner", "migrations")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built offline from a copy of the source (a build writes build/ and *.egg-info beside it)."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "-w", str(out), str(source)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    [built] = out.glob("helix-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A fresh virtualenv with the wheel installed (no dependencies, no editable helix on its path)."""
    home = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True, timeout=60)
    python = home / "bin" / "python"
    # The project's pip installs into the new environment, before anything else is on that one's path.
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                           "--no-index", "--quiet", str(wheel)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    # Flask, SQLAlchemy, Alembic, gunicorn... from the project's virtualenv. A .pth line is added after the
    # directory holding it, and the .pth files over there (the editable helix's finder) are not run.
    (Path(site) / "zz_project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return home


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment that points nowhere near the checkout, on a fresh SQLite database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIX_") and k != "PYTHONPATH"}
    env.update({"PYTHONNOUSERSITE": "1", "HELIX_DATABASE_URL": f"sqlite:///{tmp_path / 'helix.db'}",
                "HELIX_DATA_DIR": str(tmp_path / "data"), "HELIX_AUTO_UPGRADE": "false"})
    return env


def test_the_wheel_carries_every_module_and_the_migrations(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    def modules(folder: str, prefix: str = "") -> set[str]:
        return {f"{prefix}{path.relative_to(REPO)}" for path in (REPO / folder).rglob("*.py")
                if "__pycache__" not in path.parts}

    source = modules("helix_api") | modules("runner")
    revisions = modules("migrations", prefix="helix_api/")
    assert {"helix_api/migrations/env.py", "helix_api/migrations/script.py.mako"} <= names
    assert any(name.startswith("helix_api/migrations/versions/0001_") for name in names)
    assert source | revisions <= names, sorted((source | revisions) - names)


def test_the_installed_wheel_migrates_a_fresh_database_and_serves(venv, env, tmp_path):
    run = tmp_path / "elsewhere"
    run.mkdir()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import helix_api, helix_api.ops.schema_version as s; "
                            "print(helix_api.__file__); print(s.migrations_dir())"],
                           env=env, cwd=run, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    for path in map(Path, where.stdout.split()):
        assert path.is_relative_to(venv) and not path.is_relative_to(REPO), where.stdout

    upgraded = subprocess.run([str(venv / "bin" / "helix"), "db", "upgrade"], env=env, cwd=run,
                              capture_output=True, text=True, timeout=120)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert f"database at revision {head_revision()}" in upgraded.stdout

    port = free_port()
    with (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen([str(venv / "bin" / "helix"), "serve", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, cwd=run, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def status() -> int | None:
            if server.poll() is not None:
                pytest.fail(f"helix serve exited with {server.returncode}:\n{(tmp_path / 'serve.log').read_text()}")
            try:
                return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code
            except requests.RequestException:
                return None

        assert wait_for(status, 60, "the installed helix serve to answer /healthz", interval=0.2) == 200
    finally:
        with contextlib.suppress(ProcessLookupError):  # gunicorn's workers go with their master's group
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
