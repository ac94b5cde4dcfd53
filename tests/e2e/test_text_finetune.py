"""A text fine-tune end to end: upload chats -> an axolotl run in a finetune runner -> the session answers with it.

Real processes throughout: `helix serve`, a `helix-runner --backend mistral --mode finetune` that trains a
LoRA on the tiny model with axolotl on CPU, and a `--mode create` runner that answers the session's next
message with that adapter loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import psutil
import pytest

from runner.files import unzip_safely
from tests.doubles import FakeFiles, FakeReport
from tests.e2e.client import (
    cancel_session,
    create_finetune,
    create_session,
    fetch,
    get_session,
    openai_client,
    send_message,
    session_events,
    wait_for_reply,
    wait_for_session,
)
from tests.e2e.processes import SQLITE_ONLY, ApiServer, wait_for
from tests.runner.backends.text_doubles import text_config, text_task

# SQLite only: training dominates these tests, and the API's file handling is tested on both databases.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420), SQLITE_ONLY]

TRAIN = {"max_steps": 4, "learning_rate": 0.05, "lora_r": 8, "lora_alpha": 16, "seed": 3}
ASK = {"max_new_tokens": 16, "temperature": 0.8, "top_p": 0.95, "seed": 11}
QUESTION = "What is the capital of France?"


def chats() -> list[tuple[str, tuple[str, bytes, str]]]:
    """The multipart part of a chats.jsonl to train on."""
    lines = [{"messages": [{"role": "user", "content": f"What is {n} plus {n}?"},
                           {"role": "assistant", "content": f"{n} plus {n} is {2 * n}. Paris is in France."}]}
             for n in range(12)]
    return [("files", ("chats.jsonl", "".join(json.dumps(line) + "\n" for line in lines).encode(),
                       "application/jsonl"))]


def progress_of(server: ApiServer, session_id: int) -> list[dict[str, Any]]:
    """The progress events the session has stored so far."""
    return [e["data"] for e in session_events(server, server.user, session_id) if e["event"] == "progress"]


def download_adapter(server: ApiServer, session: dict[str, Any], dest: Path) -> Path:
    """The session's adapter file, fetched through the user API and unzipped."""
    refs = [f for item in session["interactions"] for f in item.get("files") or [] if f["kind"] == "adapter"]
    assert len(refs) == 1, session["interactions"]
    response = fetch(server, server.user, f"/api/v1/sessions/{session['id']}/files/{refs[0]['id']}")
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


def test_uploaded_chats_train_an_adapter_that_answers_the_next_message(text_api, tiny_mistral, text_runner, tmp_path):
    model = str(tiny_mistral)
    server = text_api
    trainer = text_runner(server, "finetune", tiny_mistral, "trainer")
    text_runner(server, "create", tiny_mistral, "server")

    tuned_id = create_finetune(server, tiny_mistral, chats(), **TRAIN)["id"]

    training = wait_for_reply(server, server.user, tuned_id, 300)
    assert training["state"] == "complete", training
    result = training["result"]
    assert result["steps"] == TRAIN["max_steps"] and isinstance(result["loss"], float)
    assert result["text"] == f"Fine-tuned {model} for {TRAIN['max_steps']} steps; final loss {result['loss']:.4f}"
    progress = progress_of(server, tuned_id)
    assert [(p["step"], p["total"]) for p in progress] == [(n, TRAIN["max_steps"]) for n in range(5)]
    assert all(isinstance(p["loss"], float) for p in progress[1:])
    assert progress[-1]["loss"] == result["loss"]
    assert "axolotl finished 4 steps" in trainer.log_text()

    session = get_session(server, server.user, tuned_id)
    assert session["mode"] == "create"
    adapter_dir = download_adapter(server, session, tmp_path / "adapter")

    # The same question with the same seed: once in the fine-tuned session, once in a fresh one.
    send_message(server, server.user, tuned_id, QUESTION, **ASK)
    plain = create_session(server, server.user, QUESTION, model=model, **ASK)
    wait_for_session(server, server.user, tuned_id, lambda s: len(s["interactions"]) > len(session["interactions"]),
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
    client = openai_client(server)
    tuned_model = f"ft:{model}:{tuned_id}"
    # Listed by the name users see (the model's directory: a path is never shown), taken by either.
    assert f"ft:{tiny_mistral.name}:{tuned_id}" in [m.id for m in client.models.list()]
    completion = client.chat.completions.create(
        model=tuned_model, messages=messages, max_tokens=ASK["max_new_tokens"], temperature=ASK["temperature"],
        top_p=ASK["top_p"], seed=ASK["seed"])
    assert completion.choices[0].message.content == tuned_reply["output"]


def test_cancelling_a_fine_tune_stops_axolotl_and_the_runner_stays_up(text_api, tiny_mistral, text_runner):
    server = text_api
    trainer = text_runner(server, "finetune", tiny_mistral, "trainer")
    session_id = create_finetune(server, tiny_mistral, chats(), **{**TRAIN, "max_steps": 10_000})["id"]
    wait_for(lambda: any(p["step"] >= 1 for p in progress_of(server, session_id)), 240, "the first training step",
             interval=0.5)

    cancel_session(server, server.user, session_id)
    assert wait_for_reply(server, server.user, session_id, 60, states=("cancelled",))["result"] is None
    trainer.wait_for_log("stopping axolotl", 30, "the runner to stop axolotl")
    pid = int(re.search(r"axolotl started \(pid (\d+)\)", trainer.log_text()).group(1))
    wait_for(lambda: not psutil.pid_exists(pid), 30, "the axolotl process to be gone")
    assert trainer.proc.poll() is None
    assert get_session(server, server.user, session_id)["mode"] == "finetune"  # no adapter, no switch
