"""containers/mistral: the entrypoint run directly (there is no Docker engine here) against a real API process."""

from __future__ import annotations

import re
import subprocess

import pytest
import requests

from tests.containers.conftest import entrypoint_env
from tests.e2e.conftest import CLAIM_PATH, REPO, ApiServer, wait_for_reply

ENTRYPOINT = REPO / "containers" / "mistral" / "entrypoint.sh"
DOCKERFILE = REPO / "containers" / "mistral" / "Dockerfile"


@pytest.mark.parametrize("missing", ["HELIX_GET_JOB_URL", "HELIX_RUNNER_TOKEN"])
def test_the_entrypoint_names_what_is_missing(tmp_path, missing):
    env = entrypoint_env(tmp_path, HELIX_GET_JOB_URL="http://127.0.0.1:9/api/v1/worker/task?mode=create&type=text"
                         "&model_name=x", HELIX_RUNNER_TOKEN="hxr_x")
    del env[missing]

    done = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=30)

    assert done.returncode == 2 and missing in done.stderr


def test_an_unknown_quantization_is_refused(tmp_path):
    env = entrypoint_env(tmp_path, HELIX_GET_JOB_URL="http://127.0.0.1:9/api/v1/worker/task?mode=create&type=text"
                         "&model_name=x", HELIX_RUNNER_TOKEN="hxr_x", HELIX_RUNNER_QUANTIZE="3bit")

    done = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=30)

    assert done.returncode == 2 and "HELIX_RUNNER_QUANTIZE" in done.stderr


@pytest.mark.slow
def test_the_entrypoint_serves_chats_from_the_job_url_with_runner_options(api_server, tiny_mistral, tmp_path):
    server: ApiServer = api_server(models=f"text:{tiny_mistral}")
    sessions = []
    for message in ("Hello there!", "Tell me a story."):
        response = requests.post(f"{server.url}/api/v1/sessions", headers=server.user, timeout=30, json={
            "mode": "create", "type": "text", "model_name": str(tiny_mistral), "message": message,
            "params": {"max_new_tokens": 8, "seed": 1}})
        assert response.status_code == 201, response.text
        sessions.append(response.json()["id"])
    env = entrypoint_env(tmp_path, HELIX_GET_JOB_URL=f"{server.url}{CLAIM_PATH}?mode=Create&type=Text"
                         f"&model_name={tiny_mistral}", HELIX_RUNNER_TOKEN=server.runner_token,
                         HELIX_RUNNER_MAX_PARALLEL="2", HELIX_RUNNER_DEVICE="cpu", HELIX_RUNNER_DTYPE="float32")

    done = subprocess.run(["sh", str(ENTRYPOINT), "--max-tasks", "2", "--wait", "2"], env=env,
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)

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
    env = entrypoint_env(tmp_path, HELIX_GET_JOB_URL=f"http://127.0.0.1:9{CLAIM_PATH}?mode=create&type=text"
                         f"&model_name={tiny_mistral}", HELIX_RUNNER_TOKEN="hxr_x", HELIX_RUNNER_QUANTIZE="4bit",
                         HELIX_RUNNER_DEVICE="cpu")

    done = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 1
    assert "needs a CUDA GPU" in done.stderr and "claiming" not in done.stderr


def test_the_dockerfile_pins_the_torch_of_constraints_and_starts_the_entrypoint():
    dockerfile = DOCKERFILE.read_text()
    pinned = re.search(r"^torch==(\S+)", (REPO / "constraints.txt").read_text(), re.MULTILINE)[1]

    assert f"ARG TORCH_VERSION={pinned}" in dockerfile
    assert re.search(r"^FROM nvidia/cuda:\S+", dockerfile, re.MULTILINE)
    assert 'pip install -c constraints.txt ".[text]"' in dockerfile
    assert "HF_HOME=/data/hf" in dockerfile
    assert "containers/mistral/entrypoint.sh" in dockerfile and "ENTRYPOINT" in dockerfile
