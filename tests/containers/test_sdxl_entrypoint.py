"""containers/sdxl: the entrypoint run directly (there is no Docker engine here) against a real API process."""

from __future__ import annotations

import io
import os
import re
import subprocess

import pytest
from PIL import Image

from tests.containers.conftest import entrypoint_env, pinned_torch, run_entrypoint, unreachable_env
from tests.e2e.client import create_session, fetch, wait_for_reply
from tests.e2e.processes import REPO, SQLITE_ONLY

ENTRYPOINT = REPO / "containers" / "sdxl" / "entrypoint.sh"
DOCKERFILE = REPO / "containers" / "sdxl" / "Dockerfile"


@pytest.mark.parametrize("missing", ["HELIX_GET_JOB_URL", "HELIX_RUNNER_TOKEN"])
def test_the_entrypoint_names_what_is_missing(tmp_path, missing):
    env = unreachable_env(tmp_path, "image")
    del env[missing]

    done = run_entrypoint(ENTRYPOINT, env)

    assert done.returncode == 2 and missing in done.stderr


@pytest.mark.slow
@SQLITE_ONLY
def test_the_entrypoint_runs_an_image_task_from_the_job_url(image_api, tiny_sdxl, tmp_path):
    server = image_api
    session = create_session(server, server.user, "a lighthouse at night", model=tiny_sdxl, type_="image", width=64,
                             height=80, num_inference_steps=2, seed=1)
    env = entrypoint_env(tmp_path, HELIX_GET_JOB_URL=server.job_url("Create", "Image", str(tiny_sdxl)),
                         HELIX_RUNNER_TOKEN=server.runner_token)

    done = run_entrypoint(ENTRYPOINT, env, "--device", "cpu", "--max-tasks", "1", "--wait", "2", timeout=180,
                          cwd=tmp_path)

    assert done.returncode == 0, done.stderr[-5000:]
    reply = wait_for_reply(server, server.user, session["id"], timeout=30)
    assert reply["state"] == "complete", reply
    image = fetch(server, server.user, reply["files"][0]["url"])
    with Image.open(io.BytesIO(image.content)) as png:
        assert png.size == (64, 80)
    assert (tmp_path / "volume" / "hf").is_dir() and (tmp_path / "volume" / "helix-runner").is_dir()


def test_the_dockerfile_pins_the_torch_of_constraints_and_starts_the_entrypoint():
    dockerfile = DOCKERFILE.read_text()

    assert f"ARG TORCH_VERSION={pinned_torch()}" in dockerfile
    assert re.search(r"^FROM nvidia/cuda:\S+", dockerfile, re.MULTILINE)
    assert 'pip install -c constraints.txt ".[image]"' in dockerfile
    assert "containers/sdxl/entrypoint.sh" in dockerfile and "ENTRYPOINT" in dockerfile
    assert os.access(ENTRYPOINT, os.X_OK)


def test_sd_scripts_is_only_an_optional_build_argument(tmp_path):
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r'^ARG SD_SCRIPTS_REF=""$', dockerfile, re.MULTILINE)
    steps = re.findall(r"^RUN (.*?)(?<!\\)$", dockerfile, re.MULTILINE | re.DOTALL)
    optional = [step for step in steps if "sd-scripts" in step]
    assert len(optional) == 1 and optional[0].startswith('if [ -n "${SD_SCRIPTS_REF}" ]')
    assert "sd-scripts" not in (REPO / "containers" / "sdxl" / "entrypoint.sh").read_text()

    # The build step itself, run with the default (empty) argument: it must not fetch anything.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "python3"):
        stub = bin_dir / tool
        stub.write_text(f"#!/bin/sh\necho {tool} was called >> {tmp_path}/calls\nexit 1\n")
        stub.chmod(0o755)
    script = optional[0]  # the shell joins the continued lines itself
    for ref, expect_calls in (("", False), ("v0.9.1", True)):
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SD_SCRIPTS_REF": ref, "TORCH_VERSION": "2.13.0",
               "TORCH_INDEX_URL": "http://127.0.0.1:9"}
        done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
        assert (done.returncode != 0) == expect_calls, done.stderr
        assert (tmp_path / "calls").exists() == expect_calls
