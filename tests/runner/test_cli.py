"""`helix-runner`: configuration from flags and environment, clear errors, a real run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main

from .conftest import API, TASK_URL, bodies

ROOT = Path(__file__).resolve().parents[2]
SEED_URL = f"{TASK_URL}?mode=Create&type=Text&model_name=mistralai/Mistral-7B-Instruct-v0.1"
ENV = {"HELIX_GET_JOB_URL": SEED_URL, "HELIX_RUNNER_TOKEN": "hxr_test",
       "HELIX_RUNNER_BACKEND": "tests.doubles:EchoBackend", "HELIX_API_URL": None}


def gets(api) -> list:
    """The GET requests the runner made (its claims and model look-ups), leaving out its profile's POST."""
    return [call.request for call in api.calls if call.request.method == "GET"]


def invoke(*args: str, **env: str | None):
    return CliRunner().invoke(main, list(args), env={**ENV, **env})


def test_missing_token_exits_nonzero_with_a_clear_message():
    result = invoke(HELIX_RUNNER_TOKEN=None)
    assert result.exit_code != 0
    assert "HELIX_RUNNER_TOKEN" in result.output


def test_missing_url_exits_nonzero_with_a_clear_message():
    result = invoke(HELIX_GET_JOB_URL=None)
    assert result.exit_code != 0
    assert "HELIX_GET_JOB_URL" in result.output


def test_api_url_needs_the_filters():
    result = invoke("--mode", "create", HELIX_GET_JOB_URL=None, HELIX_API_URL=API)
    assert result.exit_code != 0
    assert "--type, --model-name" in result.output


def test_unknown_backend_exits_nonzero_naming_the_import_path_form():
    result = invoke("--backend", "nope")
    assert result.exit_code != 0
    assert "unknown backend 'nope'" in result.output and "package.module:Class" in result.output


def test_bad_job_url_is_reported():
    result = invoke(HELIX_GET_JOB_URL="http://h/api/v1/sessions")
    assert result.exit_code != 0 and "HELIX_GET_JOB_URL" in result.output


def test_runs_a_task_from_the_seed_job_url(api, claim_json):
    api.get(TASK_URL, json=claim_json())
    api.post(f"{TASK_URL}/42/events", json={"stored": 1, "cancelled": False})
    api.post(f"{TASK_URL}/42/complete", json={"status": "complete"})
    result = invoke("--max-tasks", "1", "--wait", "0", "--runner-name", "r1")
    assert result.exit_code == 0, result.output
    claim = gets(api)[0]
    assert claim.params == {"mode": "create", "type": "text",
                            "model_name": "mistralai/Mistral-7B-Instruct-v0.1"}
    assert claim.headers["Authorization"] == "Bearer hxr_test" and claim.headers["X-Helix-Runner"] == "r1"
    assert bodies(api, "/42/complete")[0]["result"]["text"] == "how are you today?"


def test_flags_override_the_job_url(api):
    # `tiny` might be an alias: the runner asks the API first, which does not know it (so it is loaded as it is).
    api.get("http://other:1/api/v1/models/tiny", status=404, json={"error": "model_not_found", "message": "no"})
    api.get("http://other:1/api/v1/worker/task", status=401,
            json={"error": "unauthorized", "message": "bad token"})
    result = invoke("--api-url", "http://other:1/api/v1", "--model-name", "tiny", "--wait", "0")
    assert result.exit_code == 1
    assert "the API refused this runner: 401 unauthorized: bad token" in result.output
    assert gets(api)[1].params["model_name"] == "tiny"


def test_an_alias_in_the_job_url_loads_the_model_it_names_and_claims_by_it(api, claim_json, caplog):
    api.get(f"{API}/api/v1/models/tiny-echo", json={"name": "tiny-echo", "type": "text", "alias": "tiny-echo",
                                                    "full_name": "/models/echo"})
    api.get(TASK_URL, json=claim_json())
    api.post(f"{TASK_URL}/42/events", json={"stored": 1, "cancelled": False})
    api.post(f"{TASK_URL}/42/complete", json={"status": "complete"})
    caplog.set_level("INFO", logger="runner.cli")
    result = invoke("--max-tasks", "1", "--wait", "0",
                    HELIX_GET_JOB_URL=f"{TASK_URL}?mode=create&type=text&model_name=tiny-echo")
    assert result.exit_code == 0, result.output
    assert gets(api)[1].params["model_name"] == "/models/echo"
    assert "alias of /models/echo" in caplog.text


def test_python_dash_m_runner_works():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "runner", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "helix-runner" in done.stdout and "--backend" in done.stdout


@pytest.mark.timeout(60)
def test_sigterm_stops_an_idle_runner_process():
    # Nothing listens on port 9: the runner keeps retrying, and SIGTERM must still end it cleanly.
    env = {**os.environ, "PYTHONPATH": str(ROOT), **{k: v for k, v in ENV.items() if v},
           "HELIX_GET_JOB_URL": SEED_URL.replace(API, "http://127.0.0.1:9")}
    proc = subprocess.Popen([sys.executable, "-m", "runner", "--wait", "0"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert "claiming mode=create" in _read_until(proc, "claiming mode=create")
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def _read_until(proc: subprocess.Popen, needle: str) -> str:
    seen = ""
    for line in proc.stderr:
        seen += line
        if needle in line:
            break
    return seen


def test_max_parallel_takes_a_number_or_auto(monkeypatch):
    import runner.cli as cli

    seen = []
    monkeypatch.setattr(cli.Runner, "run", lambda self: seen.append(self.config) or 0)
    assert invoke("--max-parallel", "auto", "--max-parallel-cap", "12").exit_code == 0
    assert invoke("--max-parallel", "3", HELIX_RUNNER_MAX_PARALLEL=None).exit_code == 0
    assert (seen[0].parallel_auto, seen[0].max_parallel) == (True, 12)
    assert (seen[1].parallel_auto, seen[1].max_parallel) == (False, 3)
    refused = invoke("--max-parallel", "lots")
    assert refused.exit_code == 2 and "'lots' is not a number from 1 to 256, nor auto" in refused.output
    assert invoke("--max-parallel", "0").exit_code == 2


def test_tool_format_comes_from_the_flag_or_the_environment(monkeypatch):
    import runner.cli as cli

    seen = []
    monkeypatch.setattr(cli.Runner, "run", lambda self: seen.append(self.config) or 0)
    assert invoke().exit_code == 0
    assert invoke("--tool-format", "mistral").exit_code == 0
    assert invoke(HELIX_RUNNER_TOOL_FORMAT="hermes").exit_code == 0
    assert [config.tool_format for config in seen] == ["auto", "mistral", "hermes"]
    assert invoke("--tool-format", "xml").exit_code == 2


def _queries(api) -> list[list[tuple[str, str]]]:
    from urllib.parse import parse_qsl, urlsplit

    return [parse_qsl(urlsplit(request.url).query) for request in gets(api) if "/worker/task" in request.url]


def test_kind_polls_several_queues_in_one_request(api, claim_json):
    api.get(TASK_URL, json=claim_json())
    api.post(f"{TASK_URL}/42/events", json={"stored": 1, "cancelled": False})
    api.post(f"{TASK_URL}/42/complete", json={"status": "complete"})
    model = "mistralai/Mistral-7B-Instruct-v0.1"
    result = invoke("--kind", f"create:text:{model}", "--kind", f"Finetune:Text:{model}", "--max-tasks", "1",
                    "--wait", "0")
    assert result.exit_code == 0, result.output
    assert _queries(api)[0] == [("kind", f"create:text:{model}"), ("kind", f"finetune:text:{model}")]


def test_helix_runner_kinds_takes_them_comma_separated(api, claim_json):
    api.get(TASK_URL, json=claim_json())
    api.post(f"{TASK_URL}/42/events", json={"stored": 1, "cancelled": False})
    api.post(f"{TASK_URL}/42/complete", json={"status": "complete"})
    result = invoke("--max-tasks", "1", "--wait", "0", HELIX_RUNNER_KINDS="create:text:a/b,finetune:text:a/b")
    assert result.exit_code == 0, result.output
    assert _queries(api)[0] == [("kind", "create:text:a/b"), ("kind", "finetune:text:a/b")]


def test_kind_and_mode_together_are_refused():
    result = invoke("--kind", "create:text:a/b", "--mode", "create")
    assert result.exit_code != 0 and "--kind" in result.output


def test_a_kind_that_is_not_mode_type_model_is_refused():
    result = invoke("--kind", "create:text")
    assert result.exit_code != 0 and "MODE:TYPE:MODEL" in result.output
