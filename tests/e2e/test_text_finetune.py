"""A text fine-tune end to end: upload chats -> an axolotl run in a finetune runner -> the session answers with it.

Real processes throughout: `helix serve`, a `helix-runner --backend mistral --mode finetune` that trains a
LoRA on the tiny model with axolotl on CPU, and a `--mode create` runner that answers the session's next
message with that adapter loaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from runner.files import unzip_safely
from tests.doubles import FakeFiles, FakeReport
from tests.e2e.conftest import (
    ApiServer,
    RunnerProcess,
    get_session,
    read_sse,
    wait_for,
    wait_for_reply,
)
from tests.runner.backends.text_doubles import text_config, text_task

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

TRAIN = {"max_steps": 4, "learning_rate": 0.05, "lora_r": 8, "lora_alpha": 16, "seed": 3}
ASK = {"max_new_tokens": 16, "temperature": 0.8, "top_p": 0.95, "seed": 11}
QUESTION = "What is the capital of France?"


@pytest.fixture
def e2e_database(tmp_path: Path) -> str:
    """SQLite only: training dominates this test, and the API's file handling is tested on both databases."""
    return f"sqlite:///{tmp_path / 'helix.db'}"


@pytest.fixture
def runner(runner_process: Callable[..., RunnerProcess]) -> Callable[..., RunnerProcess]:
    """Start `helix-runner --backend mistral` on CPU: `runner(server, name, model=..., mode=...)`."""

    def start(server: ApiServer, name: str, *, model: str, mode: str) -> RunnerProcess:
        return runner_process(server, server.runner_token, name, backend="mistral", mode=mode, type_="text",
                              model_name=model, extra=("--device", "cpu"))

    return start


def chats() -> bytes:
    lines = [{"messages": [{"role": "user", "content": f"What is {n} plus {n}?"},
                           {"role": "assistant", "content": f"{n} plus {n} is {2 * n}. Paris is in France."}]}
             for n in range(12)]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def post_json(server: ApiServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(f"{server.url}{path}", headers=server.user, json=body, timeout=30)
    assert response.status_code in (200, 201), response.text
    return response.json()


def session_events(server: ApiServer, session_id: int) -> list[dict[str, Any]]:
    with requests.get(f"{server.url}/api/v1/sessions/{session_id}/events", headers=server.user,
                      params={"follow": "0"}, stream=True, timeout=(5, 30)) as response:
        return list(read_sse(response))


def download_adapter(server: ApiServer, session: dict[str, Any], dest: Path) -> Path:
    """The session's adapter file, fetched through the user API and unzipped."""
    refs = [f for item in session["interactions"] for f in item.get("files") or [] if f["kind"] == "adapter"]
    assert len(refs) == 1, session["interactions"]
    response = requests.get(f"{server.url}/api/v1/sessions/{session['id']}/files/{refs[0]['id']}",
                            headers=server.user, timeout=30)
    assert response.status_code == 200, response.text
    archive = dest.with_suffix(".zip")
    archive.write_bytes(response.content)
    unzip_safely(archive, dest)
    return dest


def local_answer(model: Path, messages: list[dict[str, str]], adapter_dir: Path | None = None) -> str:
    """What the Mistral backend answers in this process, with or without the adapter."""
    from runner.backends.mistral import MistralBackend

    backend = MistralBackend(text_config(model))
    backend.setup()
    files = FakeFiles()
    adapter = None
    if adapter_dir is not None:
        files.dirs[1] = adapter_dir
        adapter = {"id": 1, "sha256": "e2e-finetuned", "name": "adapter.zip"}
    return backend.predict(text_task(messages, adapter=adapter, **ASK), FakeReport(files))["text"]


def test_uploaded_chats_train_an_adapter_that_answers_the_next_message(api_server, tiny_mistral, runner, tmp_path):
    model = str(tiny_mistral)
    server = api_server(models=f"text:{model}")
    trainer = runner(server, "trainer", model=model, mode="finetune")
    runner(server, "server", model=model, mode="create")

    response = requests.post(f"{server.url}/api/v1/sessions", headers=server.user, timeout=30,
                             data={"mode": "finetune", "type": "text", "model_name": model,
                                   "params": json.dumps(TRAIN)},
                             files=[("files", ("chats.jsonl", chats(), "application/jsonl"))])
    assert response.status_code == 201, response.text
    tuned_id = response.json()["id"]

    training = wait_for_reply(server, server.user, tuned_id, 300)
    assert training["state"] == "complete", training
    result = training["result"]
    assert result["steps"] == TRAIN["max_steps"] and isinstance(result["loss"], float)
    assert result["text"] == f"Fine-tuned {model} for {TRAIN['max_steps']} steps; final loss {result['loss']:.4f}"
    progress = [e["data"] for e in session_events(server, tuned_id) if e["event"] == "progress"]
    assert [(p["step"], p["total"]) for p in progress] == [(n, TRAIN["max_steps"]) for n in range(5)]
    assert all(isinstance(p["loss"], float) for p in progress[1:])
    assert progress[-1]["loss"] == result["loss"]
    assert "axolotl finished 4 steps" in trainer.log_text()

    session = get_session(server, server.user, tuned_id)
    assert session["mode"] == "create"
    adapter_dir = download_adapter(server, session, tmp_path / "adapter")

    # The same question with the same seed: once in the fine-tuned session, once in a fresh one.
    post_json(server, f"/api/v1/sessions/{tuned_id}/messages", {"message": QUESTION, "params": ASK})
    plain = post_json(server, "/api/v1/sessions", {"mode": "create", "type": "text", "model_name": model,
                                                  "message": QUESTION, "params": ASK})
    wait_for(lambda: len(get_session(server, server.user, tuned_id)["interactions"]) > len(session["interactions"]),
             30, "the question to be stored")
    tuned_reply = wait_for_reply(server, server.user, tuned_id, 120)
    plain_reply = wait_for_reply(server, server.user, plain["id"], 120)
    assert tuned_reply["state"] == plain_reply["state"] == "complete"
    assert tuned_reply["output"] != plain_reply["output"]

    # The training turn is no part of the chat: both prompts are the question alone, so the difference
    # is the adapter's doing, and each answer is what the backend gives here with or without it.
    messages = [{"role": "user", "content": QUESTION}]
    assert tuned_reply["output"] == local_answer(tiny_mistral, messages, adapter_dir)
    assert plain_reply["output"] == local_answer(tiny_mistral, messages)

    # Any OpenAI client reaches the fine-tune by its model id, and gets the same answer.
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=server.user["Authorization"].split()[1])
    tuned_model = f"ft:{model}:{tuned_id}"
    assert tuned_model in [m.id for m in client.models.list()]
    completion = client.chat.completions.create(
        model=tuned_model, messages=messages, max_tokens=ASK["max_new_tokens"], temperature=ASK["temperature"],
        top_p=ASK["top_p"], seed=ASK["seed"])
    assert completion.choices[0].message.content == tuned_reply["output"]


def test_cancelling_a_fine_tune_stops_axolotl_and_the_runner_stays_up(api_server, tiny_mistral, runner):
    model = str(tiny_mistral)
    server = api_server(models=f"text:{model}")
    trainer = runner(server, "trainer", model=model, mode="finetune")
    response = requests.post(f"{server.url}/api/v1/sessions", headers=server.user, timeout=30,
                             data={"mode": "finetune", "type": "text", "model_name": model,
                                   "params": json.dumps({**TRAIN, "max_steps": 10_000})},
                             files=[("files", ("chats.jsonl", chats(), "application/jsonl"))])
    assert response.status_code == 201, response.text
    session_id = response.json()["id"]
    def trained_a_step() -> bool:
        return any(e["event"] == "progress" and e["data"]["step"] >= 1 for e in session_events(server, session_id))
    wait_for(trained_a_step, 240, "the first training step", interval=0.5)

    response = requests.post(f"{server.url}/api/v1/sessions/{session_id}/cancel", headers=server.user, timeout=30)
    assert response.status_code == 200, response.text
    assert wait_for_reply(server, server.user, session_id, 60, states=("cancelled",))["result"] is None
    wait_for(lambda: "stopping axolotl" in trainer.log_text(), 30, "the runner to stop axolotl")
    pid = int(re.search(r"axolotl started \(pid (\d+)\)", trainer.log_text()).group(1))
    wait_for(lambda: not psutil.pid_exists(pid), 30, "the axolotl process to be gone")
    assert trainer.proc.poll() is None
    assert get_session(server, server.user, session_id)["mode"] == "finetune"  # no adapter, no switch
