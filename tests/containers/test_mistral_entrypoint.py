"""containers/mistral: the entrypoint run directly (there is no Docker engine here) against a real API process."""

from __future__ import annotations

import re

import pytest

from tests.containers.conftest import entrypoint_env, pinned_torch, run_entrypoint, unreachable_env
from tests.e2e.client import create_session, wait_for_reply
from tests.e2e.processes import REPO, SQLITE_ONLY

ENTRYPOINT = REPO / "containers" / "mistral" / "entrypoint.sh"
DOCKERFILE = REPO / "containers" / "mistral" / "Dockerfile"


@pytest.mark.parametrize("missing", ["HELIX_GET_JOB_URL", "HELIX_RUNNER_TOKEN"])
def test_the_entrypoint_names_what_is_missing(tmp_path, missing):
    env = unreachable_env(tmp_path, "text")
    del env[missing]

    done = run_entrypoint(ENTRYPOINT, env)

    assert done.returncode == 2 and missing in done.stderr


def test_an_unknown_quantization_is_refused(tmp_path):
    env = unreachable_env(tmp_path, "text", HELIX_RUNNER_QUANTIZE="3bit")

    done = run_entrypoint(ENTRYPOINT, env)

    assert done.returncode == 2 and "HELIX_RUNNER_QUANTIZE" in done.stderr


@pytest.mark.slow
@SQLITE_ONLY
def test_the_entrypoint_serves_chats_from_the_job_url_with_runner_options(text_api, tiny_mistral, tmp_path):
    server = text_api
    sessions = [create_session(server, server.user, message, model=tiny_mistral, max_new_tokens=8, seed=1)["id"]
                for message in ("Hello there!", "Tell me a story.")]
    env = entrypoint_env(tmp_path, HELIX_GET_JOB_URL=server.job_url("Create", "Text", str(tiny_mistral)),
                         HELIX_RUNNER_TOKEN=server.runner_token, HELIX_RUNNER_MAX_PARALLEL="2",
                         HELIX_RUNNER_DEVICE="cpu", HELIX_RUNNER_DTYPE="float32")

    done = run_entrypoint(ENTRYPOINT, env, "--max-tasks", "2", "--wait", "2", timeout=180, cwd=tmp_path)

    assert done.returncode == 0, done.stderr[-5000:]
    assert "(2 at a time)" in done.stderr  # HELIX_RUNNER_MAX_PARALLEL reached the runner
    assert "on cpu (float32)" in done.stderr  # ... and so did the device and dtype
    for session_id in sessions:
        reply = wait_for_reply(server, server.user, session_id, timeout=30)
        assert reply["state"] == "complete", reply
        assert reply["result"]["usage"]["completion_tokens"] <= 8
    assert (tmp_path / "volume" / "hf").is_dir() and (tmp_path / "volume" / "helix-runner").is_dir()


@pytest.mark.slow
def test_quantizing_without_a_gpu_exits_before_claiming(tmp_path, tiny_mistral):
    env = unreachable_env(tmp_path, "text", tiny_mistral, HELIX_RUNNER_QUANTIZE="4bit", HELIX_RUNNER_DEVICE="cpu")

    done = run_entrypoint(ENTRYPOINT, env, timeout=120)

    assert done.returncode == 1
    assert "needs a CUDA GPU" in done.stderr and "claiming" not in done.stderr


def test_the_dockerfile_pins_the_torch_of_constraints_and_starts_the_entrypoint():
    dockerfile = DOCKERFILE.read_text()

    assert f"ARG TORCH_VERSION={pinned_torch()}" in dockerfile
    assert re.search(r"^FROM nvidia/cuda:\S+", dockerfile, re.MULTILINE)
    assert 'pip install -c constraints.txt ".[text]"' in dockerfile
    assert "HF_HOME=/data/hf" in dockerfile
    assert "containers/mistral/entrypoint.sh" in dockerfile and "ENTRYPOINT" in dockerfile
