"""Container entrypoints run directly (there is no Docker engine here) against a real API process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.e2e import conftest as e2e
from tests.e2e.conftest import _base_env

api_server = e2e.api_server  # the end-to-end fixture: `helix serve` as a real process


@pytest.fixture
def e2e_database(tmp_path: Path) -> str:
    """SQLite: an entrypoint does not care which database the API uses."""
    return f"sqlite:///{tmp_path / 'helix.db'}"


def entrypoint_env(tmp_path: Path, **values: str) -> dict[str, str]:
    """A container's environment: the project's virtualenv on PATH, the volume under tmp_path."""
    env = _base_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["HF_HOME"] = str(tmp_path / "volume" / "hf")
    env["HELIX_RUNNER_CACHE"] = str(tmp_path / "volume" / "helix-runner")
    env.update(values)
    return env
