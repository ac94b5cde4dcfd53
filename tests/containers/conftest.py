"""Container entrypoints run directly (there is no Docker engine here) against a real API process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.e2e import conftest as e2e
from tests.e2e.processes import CLAIM_PATH, REPO, base_env

# The end-to-end fixtures: `helix serve` as a real process, offering the tiny models.
api_server, e2e_database, text_api, image_api = e2e.api_server, e2e.e2e_database, e2e.text_api, e2e.image_api

# A job URL nothing listens on, for an entrypoint that must stop before it claims anything.
NOWHERE = f"http://127.0.0.1:9{CLAIM_PATH}"


def entrypoint_env(tmp_path: Path, **values: str) -> dict[str, str]:
    """A container's environment: the project's virtualenv on PATH, the volume under tmp_path."""
    env = base_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["HF_HOME"] = str(tmp_path / "volume" / "hf")
    env["HELIX_RUNNER_CACHE"] = str(tmp_path / "volume" / "helix-runner")
    env.update(values)
    return env


def unreachable_env(tmp_path: Path, type_: str, model: Path | str = "x", **values: str) -> dict[str, str]:
    """`entrypoint_env` with a job URL for `type_` tasks at NOWHERE and a made-up runner token."""
    return entrypoint_env(tmp_path, HELIX_GET_JOB_URL=f"{NOWHERE}?mode=create&type={type_}&model_name={model}",
                          HELIX_RUNNER_TOKEN="hxr_x", **values)


def run_entrypoint(entrypoint: Path, env: dict[str, str], *args: str, timeout: float = 30,
                   cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run an entrypoint with `sh`, as its image does; its output captured."""
    return subprocess.run(["sh", str(entrypoint), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def pinned_torch() -> str:
    """The torch version constraints.txt pins."""
    return re.search(r"^torch==(\S+)", (REPO / "constraints.txt").read_text(), re.MULTILINE)[1]
